#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one JSON object on stdout, under 8 minutes on one NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh                        # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --out /tmp/gpu-check   # keep the runs (checkpoints, metrics.jsonl)
#   bash benchmarks/gpu_check.sh --device cpu --smoke   # a tiny CPU version of every step (tests/test_gpu_check.py)
#
# Without a GPU (and without --smoke) it prints {"skipped": ...} and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" benchmarks/gpu_check.py "$@"
