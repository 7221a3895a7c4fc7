"""The GPU check: what a GPU user hits first, measured on one NVIDIA GPU in under 8 minutes.

Prints one JSON object. Steps, in order (each time-boxed; whatever the budget leaves out is
recorded as skipped, with the reason):

  environment   torch / CUDA versions, the GPU, its dense bf16 spec peak (acornlm/train/devices.py)
                and the measured bf16 matmul peak
  data          a prepared data set: the Shakespeare corpus when its cache is on this machine (no
                network is needed), else a generated corpus; throughput does not depend on the text
  train         bf16 autocast training through `acornlm train pretrain` (a fresh process per run) of
                `minimind2-small` (26M) and `gpt2-124m`, eager and torch.compile: tokens/s (median of
                the steps after warm-up), MFU against the spec peak and against the measured matmul
                peak, peak allocated / reserved GPU memory (the metrics lines' gpu_peak_* fields)
  sdpa          which backend F.scaled_dot_product_attention picks for minimind2-small's attention in
                bf16 (flash expected), and flash forward + backward against the math backend and an
                fp32 reference
  resume        the eager minimind2-small run again from its mid-run checkpoint: are the final weights
                and the metrics bitwise those of the uninterrupted run (if not, a second uninterrupted
                run tells GPU non-determinism from a resume bug)
  engine        the inference engine's decode tokens/s in bf16 at batch 1 and 16 (no CUDA graphs)
  plan          `acornlm plan --json` predicted peak memory against the measured peaks of the eager runs
  distributed   DDP and FSDP2 over NCCL with torchrun on 2 GPUs (skipped with one GPU)

    bash benchmarks/gpu_check.sh                       # on a machine with an NVIDIA GPU
    bash benchmarks/gpu_check.sh --device cpu --smoke  # every step, tiny, on the CPU (tests/test_gpu_check.py)
    ACORNLM_GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # the same

Without a GPU and without --smoke it prints {"skipped": ...} and exits 0. The numbers of a smoke run
mean nothing; it exists so that the script cannot rot between the rare runs on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GiB = 2**30
SMOKE_ENV = "ACORNLM_GPU_CHECK_SMOKE"
BUDGET_S = 450  # of the 8 minutes: the rest is Python start-up and slack
RESERVE_S = 5  # kept back from every step's timeout for the steps after it


class Budget:
    """The wall-clock budget of the whole check; every step's timeout comes out of what is left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, cap: float) -> float:
        return max(0.0, min(cap, self.left() - RESERVE_S))


class Settings:
    """What the check runs: the GPU sizes, or tiny ones for the CPU smoke run."""

    def __init__(self, device: str, smoke: bool) -> None:
        self.device = device
        self.smoke = smoke
        self.dtype = "bfloat16"
        if smoke:
            self.presets = {"tiny": {"batch_size": 4, "seq_len": 64}}
            self.steps, self.engine_new_tokens, self.engine_prompt = 6, 16, 16
            self.documents, self.vocab_size = 400, 512
            self.sdpa_shape = dict(batch=2, heads=4, kv_heads=2, seq=64, head_dim=16)
            self.matmul_size = 256
        else:
            self.presets = {"minimind2-small": {"batch_size": 32, "seq_len": 512},
                            "gpt2-124m": {"batch_size": 8, "seq_len": 1024}}
            self.steps, self.engine_new_tokens, self.engine_prompt = 30, 256, 32
            self.documents, self.vocab_size = 4000, 6400
            self.sdpa_shape = dict(batch=32, heads=8, kv_heads=2, seq=512, head_dim=64)  # minimind2-small
            self.matmul_size = 8192

    @property
    def first_preset(self) -> str:
        return next(iter(self.presets))


# --------------------------------------------------------------------------- helpers


def run_command(command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command; its return code, wall time and the tail of its output."""
    if timeout <= 0:
        return {"returncode": None, "error": "no time left in the budget", "wall_s": 0.0}
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"returncode": None, "error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    out = {"returncode": result.returncode, "wall_s": round(time.perf_counter() - started, 2),
           "stdout": result.stdout}
    if result.returncode != 0:
        out["error"] = (result.stderr or result.stdout)[-2000:]
    return out


def run_cli_in_process(args: list[str]) -> dict[str, Any]:
    """`acornlm ARGS` through its entry point in this process (no second start-up of torch), with the
    same result fields as run_command; a failure (usage error, missing command) is recorded."""
    from acornlm.cli import main as acornlm_main

    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            acornlm_main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    result = {"returncode": code, "wall_s": round(time.perf_counter() - started, 2), "stdout": out.getvalue()}
    if code != 0:
        result["error"] = (err.getvalue() or out.getvalue())[-2000:] or f"exit status {code}"
    return result


def acornlm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "acornlm", *args]


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def child_env(settings: Settings) -> dict[str, str]:
    """One thread per process for the CPU smoke run (the test machine is small and shared)."""
    return {"OMP_NUM_THREADS": "1"} if settings.smoke else {}


def flops_per_token(preset: str, seq_len: int, vocab_size: int) -> float:
    """The Trainer's MFU numerator (Transformer.flops_per_token), from a model built on the meta device;
    `vocab_size` is the tokenizer's, used where the preset leaves it to the data (0)."""
    from acornlm.model import ModelConfig, Transformer
    from acornlm.presets import load_preset

    fields = load_preset(preset)["model"]
    fields["vocab_size"] = fields.get("vocab_size") or vocab_size
    with torch.device("meta"):
        return Transformer(ModelConfig(**fields)).flops_per_token(seq_len)


def data_vocab(data: str) -> int:
    return json.loads((Path(data) / "meta.json").read_text())["tokenizer"]["vocab_size"]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- the steps


def environment(settings: Settings) -> dict[str, Any]:
    from acornlm.train.devices import gpu_spec_for
    from acornlm.train.mfu import measure_matmul_peak

    info: dict[str, Any] = {"torch": torch.__version__, "device": settings.device, "smoke": settings.smoke,
                            "load_average_1m": load_average()}
    if settings.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        spec = gpu_spec_for(props.name)
        info |= {"cuda": torch.version.cuda, "gpu": props.name, "gpus": torch.cuda.device_count(),
                 "memory_gib": round(props.total_memory / GiB, 1),
                 "spec_name": spec.name if spec else None,
                 "spec_bf16_tflops": spec.bf16_flops / 1e12 if spec else None,
                 "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled()}
    peak = measure_matmul_peak(settings.device, torch.bfloat16, size=settings.matmul_size, repeats=10)
    info["measured_bf16_matmul_tflops"] = round(peak / 1e12, 2)
    return info


def generated_corpus(folder: Path, documents: int, seed: int = 0) -> None:
    """Pseudo-text from a few thousand made-up words (enough distinct words for a 6,400-token BPE)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(8000)})
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))  # Zipf-like
    for split, count in (("train", documents), ("val", max(20, documents // 20))):
        lines = []
        for _ in range(count):
            sentences = [" ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(5, 14))).capitalize() + "."
                         for _ in range(rng.randint(4, 10))]
            lines.append(json.dumps({"text": " ".join(sentences)}))
        (folder / split).mkdir(parents=True, exist_ok=True)
        (folder / split / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare(settings: Settings, work: Path, data: Path | None) -> dict[str, Any]:
    """Prepared data for the runs: --data as given, Shakespeare from its local cache, or generated text."""
    from acornlm.data.corpus import iter_documents
    from acornlm.data.prepare import prepare_data
    from acornlm.data.shakespeare import fetch_shakespeare, read_manifest
    from acornlm.paths import cache_dir
    from acornlm.tokenizer import train_tokenizer

    if data is not None:
        return {"data": str(data), "corpus": "given"}
    corpus = work / "corpus"
    if not settings.smoke and read_manifest(cache_dir() / "shakespeare") is not None:
        fetch_shakespeare(corpus)  # from the local cache: no network
        name = "shakespeare"
    else:
        generated_corpus(corpus, settings.documents)
        name = "generated"
    train_files = sorted((corpus / "train").iterdir())
    val_files = sorted((corpus / "val").iterdir())
    tokenizer = train_tokenizer((d.text for d in iter_documents(train_files)), "bpe", settings.vocab_size)
    tokenizer.save(work / "tokenizer")
    out = work / "data"
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON report only
        meta = prepare_data(inputs=train_files, tokenizer_dir=work / "tokenizer", out=out, val_inputs=val_files,
                            workers=1 if settings.smoke else 0)
    return {"data": str(out), "corpus": name, "vocab_size": tokenizer.vocab_size,
            "train_tokens": (meta.get("train") or {}).get("tokens"), "val_tokens": (meta.get("val") or {}).get("tokens")}


def train_arguments(settings: Settings, preset: str, data: str, out: Path, steps: int, compile_: bool,
                    **extra: Any) -> list[str]:
    options = {"device": settings.device, "dtype": settings.dtype, "max_steps": steps, "log_interval": 1,
               "eval_interval": 0, "eval_batches": 1, "save_interval": 0, "warmup_steps": 2,
               "grad_accum_steps": 1, "compile": str(compile_).lower(), "progress": "false",
               **settings.presets[preset], **extra}
    args = ["train", "pretrain", "--config", preset, "--data", data, "--out", str(out)]
    for key, value in options.items():
        args += [f"--train.{key}", str(value)]
    return args


def summarize_run(lines: list[dict[str, Any]], preset: str, seq_len: int, vocab_size: int,
                  peaks: dict[str, float | None], warmup: int) -> dict[str, Any]:
    """tokens/s as the median of the steps after `warmup` (compilation, cuBLAS/cuDNN set-up), MFU, memory."""
    steady = [line["tokens_per_s"] for line in lines[warmup:] if line.get("tokens_per_s")]
    tokens_per_s = statistics.median(steady) if steady else None
    flops = flops_per_token(preset, seq_len, vocab_size)
    result: dict[str, Any] = {
        "steps": len(lines), "tokens_per_s": round(tokens_per_s) if tokens_per_s else None,
        "first_step_s": round(lines[0]["tokens_seen"] / lines[0]["tokens_per_s"], 2)
        if lines and lines[0].get("tokens_per_s") else None,
        "loss_first": lines[0]["loss"] if lines else None, "loss_last": lines[-1]["loss"] if lines else None,
        "flops_per_token": flops,
    }
    for name, peak in peaks.items():
        result[f"mfu_vs_{name}"] = round(flops * tokens_per_s / peak, 4) if peak and tokens_per_s else None
    for field in ("gpu_peak_allocated_gib", "gpu_peak_reserved_gib"):
        values = [line[field] for line in lines if line.get(field) is not None]
        result[field] = max(values) if values else None
    return result


def train(settings: Settings, budget: Budget, work: Path, data: str, preset: str, compile_: bool,
          peaks: dict[str, float | None], cap: float, **extra: Any) -> dict[str, Any]:
    """One `acornlm train pretrain` run of `preset` in bf16, in a fresh process; its figures."""
    out = work / f"run-{preset}-{'compile' if compile_ else 'eager'}"
    shutil.rmtree(out, ignore_errors=True)
    steps = settings.steps
    run = run_command(acornlm_command(*train_arguments(settings, preset, data, out, steps, compile_, **extra)),
                      budget.timeout(cap), child_env(settings))
    lines = read_lines(out / "metrics.jsonl")
    if run.get("error"):
        return {"status": "error", "error": run["error"], "wall_s": run["wall_s"], "steps_logged": len(lines)}
    seq_len = settings.presets[preset]["seq_len"]
    return {"status": "ok", "wall_s": run["wall_s"], "run_dir": str(out),
            **summarize_run(lines, preset, seq_len, data_vocab(data), peaks, warmup=max(2, steps // 3))}


def sdpa_check(settings: Settings) -> dict[str, Any]:
    """Flash attention for the model's attention shapes in bf16, against math (bf16) and an fp32 reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from acornlm.model.transformer import sdpa_attention

    shape = settings.sdpa_shape
    device = torch.device(settings.device)
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        return torch.randn(shape["batch"], heads, shape["seq"], shape["head_dim"], device=device,
                           generator=generator, dtype=torch.bfloat16)

    q, k, v = tensor(shape["heads"]), tensor(shape["kv_heads"]), tensor(shape["kv_heads"])
    grad_out = torch.randn(shape["batch"], shape["seq"], shape["heads"] * shape["head_dim"], device=device,
                           generator=generator, dtype=torch.bfloat16)

    def forward_backward(inputs: tuple[torch.Tensor, ...], backends: list) -> tuple[torch.Tensor, ...]:
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        with sdpa_kernel(backends):
            out = sdpa_attention(*leaves, None, True, 0.0)
            out.backward(grad_out.to(out.dtype))
        return (out.detach(), *(leaf.grad for leaf in leaves))

    result: dict[str, Any] = {"shape": shape, "dtype": "bfloat16"}
    try:
        chosen = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=None,
                                         enable_gqa=shape["heads"] != shape["kv_heads"])
        result["default_backend"] = SDPBackend(chosen).name
    except Exception as exc:  # noqa: BLE001 - a private helper: record what happened
        result["default_backend"] = f"unknown ({type(exc).__name__}: {exc})"
    reference = forward_backward(tuple(t.float() for t in (q, k, v)), [SDPBackend.MATH])
    math_bf16 = forward_backward((q, k, v), [SDPBackend.MATH])
    try:
        flash = forward_backward((q, k, v), [SDPBackend.FLASH_ATTENTION])
    except RuntimeError as exc:
        return result | {"status": "error", "error": f"flash attention refused these inputs: {exc}"[:600]}
    names = ("out", "grad_q", "grad_k", "grad_v")
    result["flash_vs_fp32_max_abs"] = {n: float((a.float() - r).abs().max()) for n, a, r in zip(names, flash, reference)}
    result["math_bf16_vs_fp32_max_abs"] = {n: float((a.float() - r).abs().max())
                                           for n, a, r in zip(names, math_bf16, reference)}
    # Tolerance: flash in bf16 may be off the fp32 reference by at most 2x what the math backend in
    # bf16 is, plus 1e-2 (bf16 keeps 8 mantissa bits; the inputs are N(0, 1)).
    result["flash_within_tolerance"] = all(
        result["flash_vs_fp32_max_abs"][n] <= 2 * result["math_bf16_vs_fp32_max_abs"][n] + 1e-2 for n in names)
    timings = {}
    for name, backends in (("flash", [SDPBackend.FLASH_ATTENTION]), ("math", [SDPBackend.MATH])):
        forward_backward((q, k, v), backends)  # warm up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            forward_backward((q, k, v), backends)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[name] = round((time.perf_counter() - started) / 5 * 1000, 3)
    result["forward_backward_ms"] = timings
    result["status"] = "ok" if result["flash_within_tolerance"] else "error"
    return result


def compare_checkpoints(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    diff = max(float((weights_a[k].float() - weights_b[k].float()).abs().max()) for k in weights_a)
    return {"bitwise": all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "max_abs_diff": diff}


def without_timing(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from acornlm.train.metrics import TIMING_FIELDS

    return [{k: v for k, v in line.items() if k not in TIMING_FIELDS} for line in lines]


def resume_check(settings: Settings, budget: Budget, work: Path, data: str, straight: Path) -> dict[str, Any]:
    """Continue the eager run from its mid-run checkpoint (copied to a new run directory) and compare."""
    preset, steps = settings.first_preset, settings.steps
    middle = f"step-{steps // 2:07d}"
    resumed = work / "run-resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / middle, resumed / "checkpoints" / middle)
    (resumed / "checkpoints" / "latest").write_text(middle + "\n")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    args = train_arguments(settings, preset, data, resumed, steps, False, save_interval=steps // 2, keep_last=3)
    run = run_command(acornlm_command(*args, "--resume"), budget.timeout(120), child_env(settings))
    if run.get("error"):
        return {"status": "error", "error": run["error"]}
    final = f"checkpoints/step-{steps:07d}"
    result = {"from_step": steps // 2, "to_step": steps, **compare_checkpoints(straight / final, resumed / final)}
    result["metrics_equal"] = without_timing(read_lines(resumed / "metrics.jsonl")) == \
        without_timing(read_lines(straight / "metrics.jsonl"))
    if not result["bitwise"]:  # is the GPU itself run-to-run deterministic here?
        again = work / "run-straight-again"
        shutil.rmtree(again, ignore_errors=True)
        args = train_arguments(settings, preset, data, again, steps, False, save_interval=steps // 2, keep_last=3)
        rerun = run_command(acornlm_command(*args), budget.timeout(120), child_env(settings))
        if not rerun.get("error"):
            result["uninterrupted_rerun"] = compare_checkpoints(straight / final, again / final)
    result["status"] = "ok"
    return result


def engine_check(settings: Settings, data: str) -> dict[str, Any]:
    """Decode tokens/s of the engine in bf16 (random weights: speed does not depend on them)."""
    from acornlm.infer.engine import Engine
    from acornlm.infer.sampling import SamplingParams
    from acornlm.model import ModelConfig, Transformer
    from acornlm.presets import load_preset
    from acornlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(data) / "tokenizer")
    fields = load_preset(settings.first_preset)["model"]
    fields["vocab_size"] = fields.get("vocab_size") or tokenizer.vocab_size
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**fields)).to(device=settings.device, dtype=torch.bfloat16)
    context = settings.engine_prompt + settings.engine_new_tokens + 8
    engine = Engine(model, tokenizer, max_batch=16, stop_token_ids=[], max_context=context)
    rng = random.Random(0)

    def decode(batch: int, new_tokens: int) -> float:
        for _ in range(batch):
            prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(settings.engine_prompt)]
            engine.submit(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.0),
                          on_event=lambda event: None, ignore_eos=True)
        if settings.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        while engine.step():
            pass
        if settings.device.startswith("cuda"):
            torch.cuda.synchronize()
        return batch * new_tokens / (time.perf_counter() - started)

    decode(2, 4)  # warm up kernels and the allocator
    result = {"preset": settings.first_preset, "dtype": "bfloat16", "prompt_tokens": settings.engine_prompt,
              "new_tokens": settings.engine_new_tokens, "cuda_graphs": False,
              "kv_cache_mib": round(engine.kv_cache_bytes / 2**20, 1)}
    for batch in (1, 16):
        result[f"tokens_per_s_batch{batch}"] = round(decode(batch, settings.engine_new_tokens), 1)
    result["status"] = "ok"
    return result


def plan_check(settings: Settings, data: str, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`acornlm plan --json` for each preset's eager run, against that run's measured peaks."""
    result: dict[str, Any] = {"status": "ok"}
    for preset, options in settings.presets.items():
        # "this" = the GPU; the smoke run names a GPU instead of timing the CPU's matmul peak for the plan
        device = "cuda:24GB" if settings.smoke else "this"
        args = ["plan", "--config", preset, "--data", data, "--device", device, "--json",
                "--train.dtype", settings.dtype, "--train.grad_accum_steps", "1"]
        for key, value in options.items():
            args += [f"--train.{key}", str(value)]
        run = run_cli_in_process(args)
        if run.get("error"):
            result[preset] = {"error": run["error"][-600:]}
            result["status"] = "error"
            continue
        planned = json.loads(run["stdout"])
        predicted = planned["peak_memory_bytes"]
        # The plan's fixed `overhead` (CUDA context, kernels) is memory PyTorch's allocator never sees.
        overhead = (planned.get("memory_breakdown") or {}).get("overhead", 0)
        row: dict[str, Any] = {"predicted_gib": round(predicted / GiB, 3), "overhead_gib": round(overhead / GiB, 3),
                               "breakdown_gib": {k: round(v / GiB, 3)
                                                 for k, v in (planned.get("memory_breakdown") or {}).items()}}
        eager = measured.get(preset) or {}
        for field in ("gpu_peak_allocated_gib", "gpu_peak_reserved_gib"):
            if eager.get(field):
                row[field] = eager[field]
                name = field.removeprefix("gpu_peak_").removesuffix("_gib")
                row[f"predicted_minus_overhead_over_{name}"] = round((predicted - overhead) / GiB / eager[field], 3)
        if not settings.device.startswith("cuda"):
            row["measured"] = "none: a smoke run on the CPU (benchmarks/plan_vs_measured.py measures the CPU)"
        result[preset] = row
    return result


def distributed_check(settings: Settings, budget: Budget, work: Path, data: str,
                      single: dict[str, Any]) -> dict[str, Any]:
    """DDP and FSDP2 over NCCL on 2 GPUs at the single-GPU run's global batch."""
    if not settings.device.startswith("cuda") or torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": f"needs 2+ GPUs, this machine has "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} (CPU multi-process DDP/FSDP "
                "is tested in tests/test_ddp.py and tests/test_fsdp.py)"}
    preset = settings.first_preset
    batch = settings.presets[preset]["batch_size"] // 2
    single_lines = read_lines(Path(single["run_dir"]) / "metrics.jsonl") if single.get("run_dir") else []
    result: dict[str, Any] = {"status": "ok", "world_size": 2, "preset": preset}
    for parallel in ("ddp", "fsdp"):
        out = work / f"run-{parallel}"
        shutil.rmtree(out, ignore_errors=True)
        args = train_arguments(settings, preset, data, out, settings.steps, False, batch_size=batch,
                               parallel=parallel)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "acornlm", *args]
        run = run_command(command, budget.timeout(150))
        if run.get("error"):
            result[parallel] = {"error": run["error"][-1500:]}
            result["status"] = "error"
            continue
        lines = read_lines(out / "metrics.jsonl")
        row = summarize_run(lines, preset, settings.presets[preset]["seq_len"], data_vocab(data), {},
                            warmup=max(2, settings.steps // 3))
        if single_lines:
            row["max_loss_diff_vs_1_gpu"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(lines, single_lines))
        result[parallel] = row
    return result


# --------------------------------------------------------------------------- the driver


def run_step(report: dict[str, Any], name: str, budget: Budget, function: Callable[[], dict[str, Any]],
             min_seconds: float = 10) -> dict[str, Any]:
    """Run one step into report[name]; an exception or a spent budget is recorded, never raised."""
    if budget.left() < min_seconds + RESERVE_S:
        report[name] = {"status": "skipped", "reason": f"time budget: {budget.left():.0f} s left"}
        return report[name]
    started = time.perf_counter()
    try:
        report[name] = function()
    except Exception as exc:  # noqa: BLE001 - the check goes on and says what failed
        report[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-1500:]}
    report[name].setdefault("step_s", round(time.perf_counter() - started, 2))
    return report[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny version of every step (CPU test)")
    parser.add_argument("--out", help="work folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--data", help="prepared data to train on instead of preparing some")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    args = parser.parse_args(argv)
    if os.environ.get(SMOKE_ENV) == "1":
        args.smoke, args.device = True, "cpu"
    started = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA GPU on this machine; `--device cpu --smoke` runs a tiny CPU "
                                     "version of every step", "torch": torch.__version__}))
        return 0
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs only with --smoke (the check measures a GPU)")
    settings = Settings(args.device, args.smoke)
    budget = Budget(args.budget)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="acornlm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    try:
        env = run_step(report, "environment", budget, lambda: environment(settings) | {"status": "ok"})
        peaks = {"spec_bf16_peak": (env.get("spec_bf16_tflops") or 0) * 1e12 or None,
                 "measured_matmul_peak": (env.get("measured_bf16_matmul_tflops") or 0) * 1e12 or None}
        prepared = run_step(report, "data", budget,
                            lambda: prepare(settings, work, Path(args.data) if args.data else None) | {"status": "ok"})
        if prepared.get("status") != "ok":
            return finish(report, started)
        data = prepared["data"]
        report["train"] = {}
        first = settings.first_preset
        for preset in settings.presets:
            extra = dict(save_interval=settings.steps // 2, keep_last=3) if preset == first else {}
            run_step(report["train"], f"{preset}/eager", budget,
                     lambda p=preset, e=extra: train(settings, budget, work, data, p, False, peaks, 150, **e))
        run_step(report, "sdpa", budget, lambda: sdpa_check(settings))
        eager = report["train"].get(f"{first}/eager", {})
        if eager.get("status") == "ok":
            run_step(report, "resume", budget,
                     lambda: resume_check(settings, budget, work, data, Path(eager["run_dir"])), min_seconds=20)
        else:
            report["resume"] = {"status": "skipped", "reason": f"the eager {first} run failed"}
        run_step(report, "engine", budget, lambda: engine_check(settings, data))
        measured = {p: report["train"].get(f"{p}/eager", {}) for p in settings.presets}
        run_step(report, "plan", budget, lambda: plan_check(settings, data, measured))
        run_step(report, "distributed", budget, lambda: distributed_check(settings, budget, work, data, eager),
                 min_seconds=60)
        for preset in settings.presets:
            name = f"{preset}/compile"
            if settings.smoke:
                report["train"][name] = {"status": "skipped", "reason": "smoke: a cold inductor compile takes "
                                         "~40 s on a 2-core CPU (tests/test_precision.py compares compile with eager)"}
                continue
            run_step(report["train"], name, budget,
                     lambda p=preset: train(settings, budget, work, data, p, True, peaks, 240), min_seconds=60)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return finish(report, started)


def finish(report: dict[str, Any], started: float) -> int:
    """Print the report, with a list of what failed and what was skipped."""
    def statuses(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
        found = []
        for key, value in tree.items():
            if isinstance(value, dict) and "status" in value:
                found.append((prefix + key, value["status"]))
            elif isinstance(value, dict) and key == "train":
                found += statuses(value, "train/")
        return found

    listed = statuses(report)
    report["summary"] = {
        "ok": [name for name, status in listed if status == "ok"],
        "skipped": [name for name, status in listed if status == "skipped"],
        "errors": [name for name, status in listed if status == "error"],
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_1m": load_average(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
