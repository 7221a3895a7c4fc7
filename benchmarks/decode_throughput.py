"""Batch-1 decoding speed with the KV cache: acornlm vs Hugging Face `generate`, and vs the
memory-bandwidth bound.

Decoding one token multiplies a single row through every weight matrix, so each token reads all
the weights once from memory: tokens/s can be at most (memory bandwidth) / (bytes read per token).
The bandwidth is measured here (summing a 512 MiB tensor, timed in the same rounds as the models).

Candidates (same weights, a random prompt, greedy, exactly --new-tokens tokens each):
  loop            a minimal greedy loop over model.forward with the KV cache, oneDNN products
  loop_reference  the same loop over the reference model (acornlm/model/transformer.py, not accelerated)
  loop_packed     the same loop with the weights packed for oneDNN once
                  (acornlm.accel.accelerate(model, mode="infer"), as LanguageModel and Engine apply it)
  loop_mkl        the loop with acornlm.accel.onednn.USE_ONEDNN = False (PyTorch's MKL matmuls)
  generate        acornlm.infer.generate.generate_tokens, greedy, packed weights (the real path)
  generate_sampled  the same with temperature 0.8, top-k 50, top-p 0.9 (the sampler's cost)
  generate_bf16   generate_tokens on a packed bf16 copy (`--dtype bfloat16`)
  generate_int8   generate_tokens on a copy with int8 weights (acornlm.infer.quantize, `--quantize int8`)
                  (each variant's bandwidth bound counts its own weight bytes)
  hf_llama        transformers LlamaForCausalLM.generate, greedy, use_cache=True
  hf_qwen3        transformers Qwen3ForCausalLM.generate (QK-norm: a little more work)
  loop_compiled   with --compile: the loop over torch.compile(model, dynamic=True) (compiled once
                  before timing; the KV cache length changes every step, hence dynamic shapes)

Prints one JSON object. Usage: python benchmarks/decode_throughput.py [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable

import common
import torch

from acornlm.accel import accelerate
from acornlm.accel import onednn as ops
from acornlm.infer.quantize import quantize_model
from acornlm.model import Transformer


def greedy_loop(model: Transformer, prompt: torch.Tensor, new_tokens: int, use_onednn: bool = True,
                forward: Callable[..., torch.Tensor] | None = None):
    """The least a decoder must do: prefill, then one forward of one token per new token
    (through `forward`, e.g. a compiled model, when given)."""
    forward = forward if forward is not None else model

    @torch.inference_mode()
    def run() -> list[int]:
        ops.USE_ONEDNN = use_onednn
        cache = model.new_cache(1, prompt.shape[1] + new_tokens)
        logits = forward(prompt, cache)[:, -1]
        tokens = []
        for _ in range(new_tokens):
            token = logits.argmax(dim=-1, keepdim=True)
            tokens.append(token)
            logits = forward(token, cache)[:, -1]
        ops.USE_ONEDNN = True
        return torch.cat(tokens, dim=1)[0].tolist()
    return run


def acornlm_generate(model: Transformer, prompt: torch.Tensor, new_tokens: int, **sampling):
    from acornlm.infer.generate import generate_tokens
    from acornlm.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, seed=0, **sampling)
    prompt_ids = prompt[0].tolist()
    return lambda: list(generate_tokens(model, prompt_ids, params))


def hf_generate(hf_model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int):
    @torch.inference_mode()
    def run() -> list[int]:
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=0, eos_token_id=None)
        return out[0, prompt.shape[1]:].tolist()
    return run


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes every decoded token must read: all weights (int8 ones with their scales), except
    that an input embedding that is not also the output head is only looked up (one row)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                 if name.endswith(("qweight", "scale")))
    embed = model.model.embed_tokens.weight
    if getattr(model.lm_head, "weight", None) is not embed:
        total -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    if hasattr(model.model, "embed_positions"):
        positions = model.model.embed_positions.weight
        total -= (positions.shape[0] - 1) * positions.shape[1] * positions.element_size()
    return total


def kv_bytes_per_token(model: Transformer, context: float) -> float:
    """Bytes of cached keys and values read per decoded token at an average context length."""
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context * model.dtype.itemsize


def first_difference(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every candidate once)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = PyTorch's default")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers models")
    parser.add_argument("--compile", action="store_true", help="also time the loop over torch.compile(model)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, few tokens, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.new_tokens, args.repeats = "cpu-demo", 16, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = common.preset_config(args.preset)
    if config.vocab_size == 0:
        config.vocab_size = 512
    reference = Transformer(config).eval()
    model = accelerate(copy.deepcopy(reference))  # oneDNN products, weights not packed
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens

    packed = accelerate(copy.deepcopy(reference), mode="infer")
    candidates = {
        "loop": greedy_loop(model, prompt, n),
        "loop_packed": greedy_loop(packed, prompt, n),
        "loop_reference": greedy_loop(reference, prompt, n),
        "loop_mkl": greedy_loop(model, prompt, n, use_onednn=False),
        "generate": acornlm_generate(packed, prompt, n, temperature=0.0),
        "generate_sampled": acornlm_generate(packed, prompt, n, temperature=0.8, top_k=50, top_p=0.9),
    }
    variants = {"generate_bf16": accelerate(copy.deepcopy(reference).to(torch.bfloat16), mode="infer"),
                "generate_int8": quantize_model(copy.deepcopy(model), "int8")}
    for name, variant in variants.items():
        candidates[name] = acornlm_generate(variant, prompt, n, temperature=0.0)
    if args.compile:
        candidates["loop_compiled"] = greedy_loop(model, prompt, n, forward=torch.compile(model, dynamic=True))
    hf_models = {}
    if not args.no_hf and config.family != "gpt2":
        for family in ("llama", "qwen3"):
            hf_models[family] = common.hf_twin(model, family)
            candidates[f"hf_{family}"] = hf_generate(hf_models[family], prompt, n)
    bandwidth_run, bandwidth_bytes = common.memory_bandwidth_candidate()
    candidates["memory_bandwidth"] = bandwidth_run

    outputs = {name: run() for name, run in candidates.items() if name != "memory_bandwidth"}
    times = common.time_interleaved(candidates, repeats=args.repeats, warmup=0)
    bandwidth = bandwidth_bytes / min(times.pop("memory_bandwidth"))

    context = args.prompt_tokens + n / 2
    per_token_bytes = weight_bytes_per_token(model) + kv_bytes_per_token(model, context)
    variant_bytes = {name: weight_bytes_per_token(v) + kv_bytes_per_token(v, context) for name, v in variants.items()}
    bound = bandwidth / per_token_bytes
    results = {}
    for name, seconds in times.items():
        tokens_per_s = n / min(seconds)
        own_bound = bandwidth / variant_bytes.get(name, per_token_bytes)
        results[name] = {
            **common.summarize(seconds),
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens_per_s_median": round(n / statistics.median(seconds), 1),
            "ms_per_token": round(1000 * min(seconds) / n, 3),
            "fraction_of_bandwidth_bound": round(tokens_per_s / own_bound, 3),
        }
    for ours in ("loop", "loop_packed", "generate", *variants, "loop_compiled"):
        if ours not in results:
            continue
        for theirs in ("hf_llama", "hf_qwen3", "loop_mkl", "loop"):
            if theirs in results and theirs != ours:
                results[ours][f"speedup_vs_{theirs}"] = round(
                    results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"], 3)

    print(json.dumps({
        "benchmark": "decode_throughput",
        "environment": common.environment(),
        "shape": {"preset": args.preset, "batch_size": 1, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": n, "dtype": "float32", "num_params": model.num_params()},
        "memory_bandwidth_bytes_per_s": round(bandwidth),
        "bytes_read_per_token": round(per_token_bytes),
        "bandwidth_bound_tokens_per_s": round(bound, 1),
        "bytes_read_per_token_of_variants": {name: round(b) for name, b in variant_bytes.items()},
        "bandwidth_bound_tokens_per_s_of_variants": {name: round(bandwidth / b, 1) for name, b in variant_bytes.items()},
        "greedy_tokens_match": {name: outputs[name] == outputs["loop"] for name in outputs
                                if name not in ("loop", "generate_sampled", *variants)},
        "greedy_tokens_equal_to_fp32_before_first_difference": {
            name: first_difference(outputs[name], outputs["loop"]) for name in variants},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
