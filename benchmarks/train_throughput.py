"""Training throughput (forward + backward + AdamW step) of acornlm vs Hugging Face transformers.

All models have the same shape and start from the same weights, use the same optimizer
(acornlm's AdamW groups) and the same loss (cross-entropy on fp32 logits), and are timed
round-robin in one process (see common.time_interleaved). Candidates:

  acornlm           the model as the Trainer runs it: accelerate(model) (fp32 matmuls on oneDNN,
                    see acornlm/accel/onednn.py; hand-written RMSNorm/RoPE backward; oneDNN attention)
  acornlm_reference the reference model of acornlm/model/transformer.py, not accelerated
  acornlm_mkl       the accelerated model with onednn.USE_ONEDNN = False: PyTorch's default MKL matmuls
  acornlm_sdpa      the same model with attention through SDPA's fused kernel instead of oneDNN
                    products (acornlm/accel/onednn_attention.py)
  hf_llama          transformers LlamaForCausalLM: exactly the same architecture (apples to apples)
  hf_qwen3          transformers Qwen3ForCausalLM: the same plus QK-norm (a little more work per step)
  acornlm_compiled  (--compile) torch.compile(model), default inductor settings

MFU = model.flops_per_token(seq_len) x tokens/s / matmul peak. Peaks of a 2048^3 fp32 matmul:
`mkl` (torch.matmul) and `onednn` are timed in the same rounds as the models;
`measure_matmul_peak` is acornlm.train.mfu's figure (the faster of the two, timed once at the
start). `mfu_vs_best_peak` uses the largest of the three: the honest figure.

Prints one JSON object. Usage: python benchmarks/train_throughput.py [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import common
import torch
import torch.nn.functional as F

from acornlm.accel import accelerate
from acornlm.accel import onednn as ops
from acornlm.accel import onednn_attention as attention
from acornlm.train.config import TrainConfig
from acornlm.train.mfu import measure_matmul_peak
from acornlm.train.optim import build_optimizer


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                  targets: torch.Tensor, use_onednn: bool = True, onednn_attention: bool = True):
    """One optimizer step as acornlm's pretraining does it, returned as a no-argument callable."""
    def step() -> None:
        ops.USE_ONEDNN, attention.ENABLED = use_onednn, onednn_attention
        logits = common.logits_of(model(inputs))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ops.USE_ONEDNN, attention.ENABLED = True, True
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds (each runs every candidate once)")
    parser.add_argument("--calls-per-turn", type=int, default=2,
                        help="steps each candidate runs in a row per round; only the last is timed (steady "
                             "state: 1 times the first step after another model ran)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = PyTorch's default")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers models")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model and 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.batch_size, args.seq_len, args.repeats = "cpu-demo", 2, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = common.preset_config(args.preset)
    if config.vocab_size == 0:
        config.vocab_size = 512
    reference = common.Transformer(config).train()
    model = accelerate(copy.deepcopy(reference))
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    train_config = TrainConfig()

    def candidate(net: torch.nn.Module, use_onednn: bool = True, onednn_attention: bool = True):
        return training_step(net, build_optimizer(net, train_config, torch.device("cpu")), inputs, targets,
                             use_onednn, onednn_attention)

    candidates = {"acornlm": candidate(model), "acornlm_reference": candidate(reference), "acornlm_mkl": candidate(copy.deepcopy(model), False),
                  "acornlm_sdpa": candidate(copy.deepcopy(model), onednn_attention=False)}
    if not args.no_hf and config.family != "gpt2":
        candidates["hf_llama"] = candidate(common.hf_twin(model, "llama").train())
        candidates["hf_qwen3"] = candidate(common.hf_twin(model, "qwen3").train())
    compile_seconds = None
    if args.compile:
        compiled = torch.compile(copy.deepcopy(model))
        candidates["acornlm_compiled"] = candidate(compiled)
        start = time.perf_counter()
        candidates["acornlm_compiled"]()  # compiles
        compile_seconds = time.perf_counter() - start

    peak_mkl, peak_flops = common.matmul_peak_candidate()
    n = common.MATMUL_PEAK_SIZE
    a, b = torch.randn(n, n), torch.randn(n, n)
    candidates["peak_mkl"] = peak_mkl
    if ops.ONEDNN_AVAILABLE:
        candidates["peak_onednn"] = lambda: ops.onednn_matmul(a, b)
    mfu_module_peak = measure_matmul_peak()

    times = common.time_interleaved(candidates, repeats=args.repeats, warmup=1,
                                    calls_per_turn=args.calls_per_turn)
    peaks = {"measure_matmul_peak": mfu_module_peak, "mkl": peak_flops / min(times.pop("peak_mkl"))}
    if "peak_onednn" in times:
        peaks["onednn"] = peak_flops / min(times.pop("peak_onednn"))
    best_peak = max(peaks.values())

    tokens = args.batch_size * args.seq_len
    flops_per_token = model.flops_per_token(args.seq_len)
    results = {}
    for name, seconds in times.items():
        tokens_per_s = tokens / min(seconds)
        results[name] = {
            **common.summarize(seconds),
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens_per_s_median": round(tokens / statistics.median(seconds), 1),
            "mfu_vs_mkl_peak": round(flops_per_token * tokens_per_s / peaks["mkl"], 3),
            "mfu_vs_best_peak": round(flops_per_token * tokens_per_s / best_peak, 3),
        }
    for name in ("hf_llama", "hf_qwen3", "acornlm_mkl", "acornlm_sdpa"):
        if name in results:
            for ours in ("acornlm", "acornlm_compiled"):
                if ours in results:
                    results[ours][f"speedup_vs_{name}"] = round(
                        results[ours]["tokens_per_s"] / results[name]["tokens_per_s"], 3)

    print(json.dumps({
        "benchmark": "train_throughput",
        "environment": common.environment(),
        "shape": {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "dtype": "float32", "num_params": model.num_params(), "flops_per_token": flops_per_token,
                  **{k: v for k, v in config.to_dict().items() if k in (
                      "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "vocab_size", "tie_word_embeddings")}},
        "matmul_peak_flops": {k: round(v) for k, v in peaks.items()},
        "compile_seconds": compile_seconds,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
