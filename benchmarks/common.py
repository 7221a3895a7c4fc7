"""Shared helpers for the benchmarks: fair timing on a noisy machine, the environment, the
measured hardware ceilings (matmul peak, memory bandwidth) and Hugging Face twins of a model.

Fair timing: every candidate runs once per round, in a rotating order, for several rounds, so
a burst of load from another process hits all candidates alike. The best round estimates what
the code can do; the median says how noisy the machine was.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Make `import acornlm` work when a benchmark is run as `python benchmarks/x.py` from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acornlm.allocator import keep_freed_memory  # noqa: E402
from acornlm.model import ModelConfig, Transformer  # noqa: E402
from acornlm.presets import load_preset  # noqa: E402

# As `acornlm` commands and the Trainer do, for every candidate alike (HF models included);
# ACORNLM_KEEP_FREED_MEMORY=0 measures glibc's default behaviour instead.
keep_freed_memory()

MATMUL_PEAK_SIZE = 2048  # the same square matmul as acornlm.train.mfu.measure_matmul_peak


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 1, calls_per_turn: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each candidate, run round-robin so load bursts hit all of them.

    The starting candidate rotates each round so none is always first after a pause. With
    calls_per_turn > 1 a candidate runs that many times in a row per turn and only the last call
    is timed: the steady state of a loop that repeats one step (training), not the first step
    after another model has run in between (other weights and activations in the caches).
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_idx in range(repeats):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(calls_per_turn - 1):
                candidates[name]()
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summarize(seconds: list[float]) -> dict[str, float]:
    return {"best_s": min(seconds), "median_s": statistics.median(seconds), "runs": len(seconds)}


def matmul_peak_candidate(dtype: torch.dtype = torch.float32) -> tuple[Callable[[], None], float]:
    """A callable doing one 2048^3 matmul and its FLOPs, to time interleaved with the real work.

    Timing the peak in the same rounds as the model keeps MFU honest on a shared machine: a
    peak measured in a quiet moment and a model timed in a busy one would understate MFU, and
    the reverse would overstate it.
    """
    n = MATMUL_PEAK_SIZE
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.matmul(a, b, out=out)), 2.0 * n**3


def memory_bandwidth_candidate(megabytes: int = 512) -> tuple[Callable[[], None], float]:
    """A callable that reads a tensor far larger than the caches (a sum), and the bytes it reads.

    Decoding one token reads every weight once, so read bandwidth is its ceiling.
    """
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    return (lambda: data.sum()), float(data.numel() * data.element_size())


def environment() -> dict[str, object]:
    """What the numbers depend on: versions, threads, CPU and how loaded the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "keep_freed_memory": keep_freed_memory(),
    }


def preset_config(name: str) -> ModelConfig:
    return ModelConfig.from_dict(load_preset(name)["model"])


def hf_config_kwargs(config: ModelConfig) -> dict[str, object]:
    """The transformers Llama/Qwen3 config fields that describe the same shape as `config`."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
    }


def hf_twin(model: Transformer, family: str) -> torch.nn.Module:
    """A transformers LlamaForCausalLM or Qwen3ForCausalLM with the same shape and the same weights.

    Llama is the exact twin of a Llama-family acornlm model. Qwen3 additionally applies RMSNorm to
    every query and key head (QK-norm); its norm weights start at 1, so with our weights loaded it
    computes the same function but does that extra work, as a real Qwen3 of this shape would.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    kwargs = hf_config_kwargs(model.config)
    if family == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**kwargs, attn_implementation="sdpa"))
    elif family == "qwen3":
        hf = Qwen3ForCausalLM(Qwen3Config(**kwargs, attn_implementation="sdpa"))
    else:
        raise ValueError(f"unknown family {family!r}")
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    extra = [k for k in missing if not k.endswith(("q_norm.weight", "k_norm.weight"))]
    if extra or unexpected:
        raise RuntimeError(f"state dicts differ: missing {extra}, unexpected {unexpected}")
    return hf.eval()


def logits_of(output: object) -> torch.Tensor:
    """Our model returns logits; transformers models return an output object holding them."""
    return output if isinstance(output, torch.Tensor) else output.logits
