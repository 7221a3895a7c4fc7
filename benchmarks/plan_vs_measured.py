"""The planner's predicted peak memory (acornlm/train/plan.py) against a real run's, on this CPU.

Each configuration runs `run_pretrain` (the same code as `acornlm train pretrain`: data, model,
Trainer, evaluation and the final checkpoint) for a few steps in a fresh subprocess, and measures
two peaks, both relative to the moment just before run_pretrain (torch and acornlm imported):

    live  the most bytes the C allocator had handed out and not yet freed (glibc's mallinfo2():
          uordblks + hblkhd), read after every PyTorch operation by a TorchDispatchMode: the bytes
          of the tensors alive at once, which is what the plan models (on a GPU its twin is
          torch.cuda.max_memory_allocated). Temporaries inside one operation are not seen.
    rss   the process's peak resident memory (VmHWM) minus its RSS before: what the OS sees. It is
          higher than `live` by the allocator's fragmentation: the Trainer keeps freed memory in the
          process (acornlm/allocator.py: no mmap, no trimming), and a freed hole is reused only by
          a request that fits in it. Run with ACORNLM_KEEP_FREED_MEMORY=0 to compare.

Both include what the plan does not model (the data memmap's touched pages, oneDNN scratch, the
tokenizer, evaluation, writing the checkpoint); none of them is near the training step's peak.

    .venv/bin/python benchmarks/plan_vs_measured.py            # prints one JSON object
    flock /tmp/acornlm-bench.lock .venv/bin/python benchmarks/plan_vs_measured.py

The target is |predicted / measured - 1| <= 0.15 for every configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, preset, overrides of the train section, overrides of the model section)
CONFIGURATIONS = [
    ("minimind2-small b8x256 none", "minimind2-small", {"batch_size": 8, "seq_len": 256}, {}),
    ("minimind2-small b8x256 full", "minimind2-small",
     {"batch_size": 8, "seq_len": 256, "activation_checkpointing": "full"}, {}),
    ("minimind2-small b8x256 selective", "minimind2-small",
     {"batch_size": 8, "seq_len": 256, "activation_checkpointing": "selective"}, {}),
    ("gpt2-124m(vocab 300) b4x256 none", "gpt2-124m", {"batch_size": 4, "seq_len": 256}, {}),
    ("qwen3-tiny b32x256 none", "qwen3-tiny", {"batch_size": 32, "seq_len": 256}, {}),
    ("minimind2-moe b8x128 none", "minimind2-moe", {"batch_size": 8, "seq_len": 128}, {}),
    ("minimind2-small b16x512 muon", "minimind2-small",
     {"batch_size": 16, "seq_len": 512, "optimizer": "muon"}, {}),
]
STEPS = 3


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(spec: dict) -> dict:
    """Run one configuration in this (fresh) process and return predicted and measured bytes."""
    import dataclasses

    from acornlm.model import ModelConfig
    from acornlm.presets import load_preset
    from acornlm.train.config import TrainConfig
    from acornlm.train.devices import DeviceSpec
    from acornlm.train.plan import plan_memory, resolve_vocab
    from acornlm.train.pretrain import run_pretrain

    preset = load_preset(spec["preset"])
    model_fields = {**preset["model"], **spec["model"]}
    model_fields["vocab_size"] = 0  # the tokenizer's (the generated corpus's 300-token BPE)
    train_fields = {**preset.get("train", {}), **spec["train"], "max_steps": STEPS, "warmup_steps": 1,
                    "eval_interval": 0, "eval_batches": 1, "save_interval": 0, "log_interval": 1,
                    "grad_accum_steps": 1, "progress": False, "device": "cpu", "max_minutes": 0}
    model = ModelConfig(**model_fields)
    train = TrainConfig(**{k: v for k, v in train_fields.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    resolved, _ = resolve_vocab(model, spec["data"])
    cpu = DeviceSpec("cpu", 1 << 40, 1e11, 0.0, kind="cpu")
    plan = plan_memory(resolved, train, cpu)
    before = status_kib("VmRSS") * 1024
    with LiveBytes() as live:
        summary = run_pretrain(spec["data"], spec["out"], model, train)
    rss = status_kib("VmHWM") * 1024 - before
    return {"name": spec["name"], "params": summary["params"], "batch_size": train.batch_size,
            "seq_len": train.seq_len, "activation_checkpointing": train.activation_checkpointing,
            "optimizer": train.optimizer, "predicted_bytes": plan.total, "measured_live_bytes": live.peak,
            "relative_error": round(plan.total / live.peak - 1, 4), "measured_rss_bytes": rss,
            "rss_over_live": round(rss / live.peak, 3), "predicted_over_rss": round(plan.total / rss, 3),
            "breakdown": plan.breakdown(), "rss_before_bytes": before,
            "keep_freed_memory": os.environ.get("ACORNLM_KEEP_FREED_MEMORY", "1") != "0"}


class MallocInfo(ctypes.Structure):
    """glibc's struct mallinfo2 (size_t fields, glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


class LiveBytes(TorchDispatchMode):
    """Records the peak of the allocator's in-use bytes (heap + mmapped blocks) after every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = MallocInfo
        self.start = self.in_use()
        self.peak = 0

    def in_use(self) -> int:
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.start)
        return out


def prepare_data(root: Path) -> Path:
    """A ~1 MB generated corpus and a 300-token BPE, prepared with the real `prepare_data`."""
    import random

    from acornlm.data.prepare import prepare_data as prepare
    from acornlm.tokenizer import train_tokenizer

    words = ("the king queen castle river stone green light dark sword song night morning bread "
             "friend enemy walks speaks sleeps sings finds keeps under over near with from and but").split()
    rng = random.Random(0)

    def documents(count: int) -> list[str]:
        return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 200))) for _ in range(count)]

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    train_docs, val_docs = documents(6000), documents(200)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer(train_docs[:500], kind="bpe", vocab_size=300).save(corpus / "tokenizer")
    out = root / "data"
    with contextlib.redirect_stdout(sys.stderr):
        prepare(inputs=[corpus / "train.jsonl"], tokenizer_dir=corpus / "tokenizer", out=out,
                val_inputs=[corpus / "val.jsonl"], workers=1)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(Path(tmp))
        for index, (name, preset, train, model) in enumerate(CONFIGURATIONS):
            spec = {"name": name, "preset": preset, "train": train, "model": model, "data": str(data),
                    "out": str(Path(tmp) / f"run{index}")}
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                results.append({"name": name, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    errors = [abs(r["relative_error"]) for r in results if "relative_error" in r]
    report = {"benchmark": "plan_vs_measured",
              "measure": "relative_error = predicted / peak live allocator bytes - 1 (see the docstring); "
                         "measured_rss_bytes = VmHWM - VmRSS before run_pretrain",
              "steps": STEPS, "load_average": os.getloadavg(), "results": results,
              "max_abs_relative_error": max(errors) if errors else None,
              "within_15_percent": all(e <= 0.15 for e in errors) and len(errors) == len(results)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
