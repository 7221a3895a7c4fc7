"""Throughput and memory of `acornlm eval contamination` on a generated corpus (1 GB by default).

The corpus is English words and Chinese characters in lines, with a few benchmark questions copied
into it verbatim; the benchmark is C-Eval-shaped (Chinese) and ARC-shaped (English) questions. The
scan runs in a fresh process so its peak memory is its own. Prints one JSON object with MB/s, peak
resident memory and whether exactly the planted questions were found.

    .venv/bin/python benchmarks/contamination.py [--gigabytes 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402
from eval_bench import chinese, english, make_data  # noqa: E402

SCAN = """
import json, sys
from acornlm.eval.benchmarks import load_items
from acornlm.eval.contamination import check_contamination
items = load_items(sys.argv[2:]).items
report = check_contamination(items, [sys.argv[1]], n=13, threshold=0.5)
print(json.dumps({k: v for k, v in report.items() if k not in ("items", "subjects")}
                 | {"flagged": sorted(r["where"] for r in report["items"] if (r["fraction"] or 0) >= 0.5)}))
"""


def write_corpus(file: Path, size: int, planted: list[str], seed: int = 0) -> None:
    """`size` bytes of lines: a 16 MB pool of random text written in shifted copies, plus the planted texts."""
    rng = random.Random(seed)
    pool = "\n".join(english(rng, 60) + " " + chinese(rng, 80) for _ in range(16 << 20 // 420)) + "\n"
    written = 0
    with open(file, "w", encoding="utf-8") as handle:
        for index in range(10**9):
            if written >= size:
                break
            shift = rng.randrange(len(pool))
            piece = pool[shift:] + pool[:shift]
            if index < len(planted):
                piece = piece[: len(piece) // 2] + "\n" + planted[index] + "\n" + piece[len(piece) // 2:]
            handle.write(piece)
            written += len(piece.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--questions", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="a 32 MB corpus: a smoke run")
    args = parser.parse_args()
    size = (32 << 20) if args.quick else int(args.gigabytes * 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ceval, arc = make_data(root, args.questions, seed=5)
        from acornlm.eval.benchmarks import load_items
        from acornlm.eval.contamination import item_text

        items = load_items([ceval, arc]).items
        planted_items = [items[3], items[len(items) // 2], items[-1]]
        write_corpus(root / "corpus.txt", size, [item_text(i.question, i.choices) for i in planted_items])
        scan = subprocess.run([sys.executable, "-c", SCAN, str(root / "corpus.txt"), str(ceval), str(arc)],
                              capture_output=True, text=True, check=True)
        report = json.loads(scan.stdout.strip().splitlines()[-1])
    flagged = report.pop("flagged")
    print(json.dumps({"benchmark": "contamination", "environment": environment(),
                      "benchmark_questions": len(items), **report,
                      "planted": len(planted_items),
                      "found_exactly_the_planted": sorted(i.where for i in planted_items) == flagged}, indent=2))


if __name__ == "__main__":
    main()
