"""Throughput of `acornlm eval bench`: questions per second on C-Eval-shaped (Chinese, letter method,
5-shot) and ARC-shaped (English, likelihood method, 0-shot) questions, for the demo model (cpu-demo)
and MiniMind2-Small, with lm-eval's transformers backend on the same items beside it.

The models have random weights (speed does not depend on what they learned) and a BPE tokenizer
trained on generated text of the same alphabet. Prints one JSON object.

    .venv/bin/python benchmarks/eval_bench.py [--quick] [--no-hf] [--questions 200]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, preset_config  # noqa: E402
from eval_fixtures import ARC_TASK_YAML, CEVAL_HEADER, write_csv, write_jsonl  # noqa: E402

import acornlm  # noqa: E402
from acornlm.eval.bench import evaluate_benchmark  # noqa: E402
from acornlm.eval.benchmarks import load_items  # noqa: E402
from acornlm.model import Transformer  # noqa: E402
from acornlm.model.checkpoint import write_model_files  # noqa: E402
from acornlm.tokenizer import train_tokenizer  # noqa: E402

HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"
WORDS = ("the of and to in is was that for on with as by at from which be this are an or have not had but "
         "his they her she he it you we what water light energy plant animal earth sun moon rock heat cell").split()


def chinese(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(HANZI) for _ in range(length))


def english(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length)).capitalize()


def make_data(root: Path, questions: int, seed: int = 0) -> tuple[Path, Path]:
    """C-Eval layout with 4 subjects (questions of ~40 characters, options of ~8) and an ARC jsonl."""
    rng = random.Random(seed)
    subjects = ["accountant", "computer_network", "high_school_physics", "law"]
    for subject in subjects:
        write_csv(root / "ceval" / "dev" / f"{subject}_dev.csv", CEVAL_HEADER,
                  [[i, chinese(rng, 40) + "？", *(chinese(rng, 8) for _ in range(4)), rng.choice("ABCD"), ""]
                   for i in range(5)])
        write_csv(root / "ceval" / "val" / f"{subject}_val.csv", CEVAL_HEADER[:-1],
                  [[i, chinese(rng, 40) + "？", *(chinese(rng, 8) for _ in range(4)), rng.choice("ABCD")]
                   for i in range(questions // len(subjects))])
    arc = write_jsonl(root / "arc.jsonl", [
        {"id": f"q{i}", "question": english(rng, 18) + "?",
         "choices": {"text": [english(rng, rng.randint(2, 8)) for _ in range(4)], "label": list("ABCD")},
         "answerKey": rng.choice("ABCD")} for i in range(questions)])
    return root / "ceval", arc


def make_checkpoint(root: Path, preset: str, layers: int | None = None) -> Path:
    fields = preset_config(preset).to_dict()
    fields["vocab_size"] = fields["vocab_size"] or 4096  # cpu-demo takes the demo tokenizer's 4096
    if layers is not None:
        fields.update(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2)
    config = type(preset_config(preset)).from_dict(fields)
    rng = random.Random(1)
    texts = [chinese(rng, 400) + " " + english(rng, 80) for _ in range(400)]
    tokenizer_dir = root / f"{preset}-tokenizer"
    train_tokenizer(texts, "bpe", config.vocab_size).save(tokenizer_dir)
    torch.manual_seed(0)
    model = Transformer(config)
    (root / preset).mkdir()
    write_model_files(root / preset, model, {"stage": "pretrain"}, tokenizer_dir=tokenizer_dir)
    return root / preset


def acornlm_rate(ckpt: Path, data: Path, method: str, shots: int, batch_size: int) -> dict:
    lm = acornlm.load(ckpt)
    benchmark = load_items([data])
    evaluate_benchmark(lm, benchmark, shots=shots, method=method, batch_size=batch_size, limit=4, progress=False)
    started = time.perf_counter()
    run = evaluate_benchmark(lm, benchmark, shots=shots, method=method, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - started
    return {"questions": len(run.results), "seconds": round(seconds, 3),
            "questions_per_second": round(len(run.results) / seconds, 2),
            "truncated": sum(r.truncated for r in run.results)}


def lm_eval_rates(ckpt: Path, arc: Path, root: Path, batch_size: int) -> dict:
    """The same ARC items through lm-eval twice: its own transformers backend on the HF export of the
    checkpoint, and our AcornLM class; both times include lm-eval's own request building."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from acornlm.eval.harness import AcornLM
    from acornlm.export.hf import export_hf

    hf_dir = root / f"{ckpt.name}-hf"
    with contextlib.redirect_stdout(io.StringIO()):
        export_hf(ckpt, hf_dir, verify=False)
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "arc.yaml").write_text(ARC_TASK_YAML.format(name="bench_arc", data=arc), encoding="utf-8")
    manager = TaskManager(include_path=str(tasks))
    models = {"lm_eval_hf": HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=batch_size),
              "lm_eval_acornlm": AcornLM(pretrained=str(ckpt), batch_size=batch_size)}
    rates = {}
    for name, model in models.items():
        lm_eval.simple_evaluate(model=model, tasks=["bench_arc"], task_manager=manager, limit=4)  # warm-up
        started = time.perf_counter()
        results = lm_eval.simple_evaluate(model=model, tasks=["bench_arc"], task_manager=manager)
        seconds = time.perf_counter() - started
        count = results["n-samples"]["bench_arc"]["effective"]
        rates[name] = {"questions": count, "seconds": round(seconds, 3),
                       "questions_per_second": round(count / seconds, 2), "acc": results["results"]["bench_arc"]["acc,none"]}
    rates["acornlm_speedup_inside_lm_eval"] = round(rates["lm_eval_acornlm"]["questions_per_second"]
                                                    / rates["lm_eval_hf"]["questions_per_second"], 2)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few questions: a smoke run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = 16 if args.quick else args.questions
    result: dict = {"benchmark": "eval_bench", "environment": environment(), "questions": questions, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ceval, arc = make_data(root, questions)
        for preset in ("cpu-demo", "minimind2-small"):
            ckpt = make_checkpoint(root, preset, layers=2 if args.quick else None)
            entry = {
                "ceval_letter_5shot": acornlm_rate(ckpt, ceval, "letter", 5, args.batch_size),
                "ceval_likelihood_0shot": acornlm_rate(ckpt, ceval, "likelihood", 0, args.batch_size),
                "arc_likelihood_0shot": acornlm_rate(ckpt, arc, "likelihood", 0, args.batch_size),
            }
            if not args.no_hf:
                entry["arc_likelihood_0shot_through_lm_eval"] = lm_eval_rates(ckpt, arc, root, args.batch_size)
            result["models"][preset] = entry
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
