"""Per-rank memory of DDP against FSDP2 on CPU (gloo, 2 processes): what each rank holds of the
weights, gradients and AdamW state after a training step, and each rank's peak RSS and its RSS after the second step (Linux: /proc/self/statm).

    python benchmarks/fsdp_memory.py [--preset minimind2-small] [--processes 2]

prints one JSON object. The training-state bytes are counted from the tensors each rank holds
(local shards under FSDP); DDP adds its gradient buckets (a second copy of the gradients, in
`ddp_buckets_bytes`, estimated as the gradient bytes: DDP's default is gradient_as_bucket_view=False).
The peak RSS also includes the Python interpreter, torch's libraries, activations and, at start,
the whole model every rank builds before sharding it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, os, resource, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from acornlm.accel import accelerate
from acornlm.model import ModelConfig, Transformer
from acornlm.presets import load_preset
from acornlm.train.config import TrainConfig
from acornlm.train.distributed import DistributedContext
from acornlm.train.optim import build_optimizer
from acornlm.train.parallel import parallelize
from acornlm.train.precision import select_precision

preset, parallel, out = sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
context = DistributedContext(rank, world, rank)
device = torch.device("cpu")
torch.manual_seed(0)
model_config = ModelConfig(**load_preset(preset)["model"])
model = accelerate(Transformer(model_config), device)
config = TrainConfig(parallel=parallel, batch_size=2, seq_len=128)
train_model, _ = parallelize(model, config, context, device, select_precision(device, "float32"))
optimizer = build_optimizer(model, config, device)
tokens = torch.randint(0, model_config.vocab_size, (config.batch_size, config.seq_len + 1))
for _ in range(2):
    logits = train_model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    grads = sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
    if _ == 0:
        optimizer.zero_grad(set_to_none=True)
weights = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
state = sum(local(v).numel() * local(v).element_size() for s in optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor))
result = {"rank": rank, "params": sum(p.numel() for p in model.parameters()), "weights_bytes": weights,
          "grads_bytes": grads, "optimizer_bytes": state,
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "rss_after_step_bytes": int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
"""


def measure(preset: str, parallel: str, processes: int, folder: Path) -> list[dict]:
    script = folder / "worker.py"
    script.write_text(WORKER)
    out = folder / parallel
    repo = str(Path(__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(processes), str(script), repo, preset, parallel, str(out)],
                   check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    result = {"preset": args.preset, "processes": args.processes, "device": "cpu (gloo)",
              "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as folder:
        for parallel in ("ddp", "fsdp"):
            ranks = measure(args.preset, parallel, args.processes, Path(folder))
            for entry in ranks:
                entry["training_state_bytes"] = entry["weights_bytes"] + entry["grads_bytes"] + entry["optimizer_bytes"]
                if parallel == "ddp":
                    entry["ddp_buckets_bytes"] = entry["grads_bytes"]
            result[parallel] = ranks
    ddp = max(r["training_state_bytes"] + r.get("ddp_buckets_bytes", 0) for r in result["ddp"])
    fsdp = max(r["training_state_bytes"] for r in result["fsdp"])
    result["training_state_ratio_fsdp_over_ddp"] = fsdp / ddp
    result["benchmark_rusage_self_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
