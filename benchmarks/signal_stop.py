"""Save on signal: how long a run takes to stop after SIGTERM, and what the per-step agreement costs.

    stop_seconds            SIGTERM sent -> process exited (finish the step, save the checkpoint,
                            write the loss curve, leave the process group), for a real
                            `acornlm train pretrain --config tiny` run, one process and torchrun x 2
    exit_status             what the run exited with (143 = 128 + SIGTERM; torchrun's own is 1)
    agreement_us_per_step   the MAX all-reduce every step pays so that all ranks stop at the same
                            step (acornlm.train.distributed.max_over_ranks), gloo, 2 processes, one
                            call timed over many; a single process pays nothing (no collective)

The stop time is dominated by the checkpoint write and, under torchrun, by torchrun's own shutdown
(it polls its workers); on a GPU with a large model it is the time to write the checkpoint.

Usage: flock /tmp/acornlm-bench.lock python benchmarks/signal_stop.py --data PREPARED_DIR [--out DIR]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

AGREEMENT_SCRIPT = """
import json, os, sys, time
import torch
import torch.distributed as dist
from acornlm.train.distributed import max_over_ranks
dist.init_process_group("gloo")
device = torch.device("cpu")
for _ in range(50):
    max_over_ranks(0, device)
calls = int(sys.argv[1])
start = time.perf_counter()
for _ in range(calls):
    max_over_ranks(0, device)
seconds = time.perf_counter() - start
if dist.get_rank() == 0:
    print(json.dumps({"agreement_us_per_step": seconds / calls * 1e6}))
dist.destroy_process_group()
"""


def pretrain_args(data: Path, out: Path, batch_size: int) -> list[str]:
    return ["train", "pretrain", "--config", "tiny", "--data", str(data), "--out", str(out),
            "--train.max_steps", "100000", "--train.save_interval", "100000", "--train.progress", "false",
            "--train.batch_size", str(batch_size)]


def logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def stop_after(command: list[str], run_dir: Path, steps: int = 20) -> dict:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    while logged_steps(run_dir) < steps:
        if process.poll() is not None:
            raise RuntimeError(process.communicate()[1][-2000:])
        time.sleep(0.005)
    sent = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=300)
    seconds = time.perf_counter() - sent
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    return {"stop_seconds": round(seconds, 3), "exit_status": process.returncode, "checkpoints": checkpoints}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared data (acornlm data prepare)")
    parser.add_argument("--out", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--calls", type=int, default=2000, help="all-reduces timed for the agreement cost")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="acornlm-signal-"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    one = stop_after([sys.executable, "-m", "acornlm", *pretrain_args(args.data, out / "one", 4)], out / "one")
    two = stop_after([*torchrun, "-m", "acornlm", *pretrain_args(args.data, out / "two", 2)], out / "two")
    script = out / "agreement.py"
    script.write_text(AGREEMENT_SCRIPT)
    agreement = subprocess.run([*torchrun, str(script), str(args.calls)], capture_output=True, text=True,
                               env=ENV, timeout=300, check=True)
    result = {
        "one_process": one,
        "torchrun_2_processes": two,
        **json.loads(agreement.stdout.strip().splitlines()[-1]),
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
