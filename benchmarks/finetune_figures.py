"""Fine-tuning figures: SFT -> GRPO -> DPO on a small model, offline, on a CPU, in minutes.

The pipeline is acornlm.cli.finetune_pipeline, which `make demo` also runs after pretraining (with settings
re-tuned for its pretrained model in acornlm/cli/demo_finetune.py); the settings here are for:

  start  a BPE tokenizer (512 tokens) trained on the synthetic tasks' chats and a random 4-layer,
         128-wide model, or --init CKPT (e.g. the demo's pretrained model, same tokenizer needed
         for the tasks to tokenize well; any acornlm checkpoint works).
  sft    full fine-tuning on every synthetic task (acornlm.data.tasks), packed rows.
         Figure: held-out exact-match accuracy per task before -> after.
  grpo   from the SFT model, on arithmetic prompts rewarded by the task's checker (1 if the
         answer is exactly right). Figure: held-out arithmetic accuracy (greedy) before -> after.
  dpo    from the GRPO model, on synthetic pairs: the correct answer beats another question's
         answer. Figure: held-out preference accuracy (share of held-out pairs whose implicit
         reward beta*log(pi/pi_ref) is higher for the correct answer), and how often the models
         themselves rank the correct answer as more likely, before -> after.

Accuracies use `evaluate_tasks` (greedy, held-out questions that never occur in training). The
load average is printed with each stage: other work on the machine slows everything down.
Prints one JSON object (progress goes to stderr).

Usage: python benchmarks/finetune_figures.py [--work-dir runs/finetune_figures] [--init CKPT]
                                             [--sft CKPT] [--stages sft,grpo,dpo] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acornlm.cli.finetune_pipeline import PipelineSettings, load_average, run_pipeline  # noqa: E402
from acornlm.data.chat import chat_text  # noqa: E402
from acornlm.data.tasks import make_dataset  # noqa: E402
from acornlm.model import ModelConfig, Transformer  # noqa: E402
from acornlm.model.checkpoint import resolve_checkpoint, write_model_files  # noqa: E402
from acornlm.tokenizer import train_tokenizer  # noqa: E402
from acornlm.train.config import TrainConfig  # noqa: E402

# The settings of each stage (the figures in the module docstring come from these).
START_MODEL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                   max_position_embeddings=128, rope_theta=10000.0)
SETTINGS = PipelineSettings(
    # GRPO can only sharpen what SFT taught: it needs a base that answers some arithmetic right
    # (about 18% here), so SFT sees extra arithmetic on top of every task.
    sft_train=TrainConfig(max_steps=1300, batch_size=32, seq_len=64, learning_rate=3e-3, min_lr=3e-4,
                          warmup_steps=20, weight_decay=0.0, eval_interval=500, eval_batches=2, save_interval=500,
                          log_interval=50, progress=False),
    sft_examples=2000, sft_extra_arithmetic=15000,
    # 32 prompts x 8 samples per step: a low learning rate and a big group batch (smaller batches or
    # a learning rate of 1e-4 made arithmetic *worse*: Adam turns a noisy reward signal into a random walk).
    grpo_train=TrainConfig(max_steps=60, batch_size=32, seq_len=64, learning_rate=3e-5, min_lr=3e-5, warmup_steps=5,
                           weight_decay=0.0, eval_interval=0, eval_batches=2, save_interval=0, log_interval=5,
                           progress=False),
    dpo_train=TrainConfig(max_steps=300, batch_size=16, seq_len=64, learning_rate=3e-4, min_lr=3e-5, warmup_steps=10,
                          weight_decay=0.0, eval_interval=0, eval_batches=4, save_interval=0, log_interval=10,
                          progress=False),
    eval_examples=200, grpo_eval_examples=500, dpo_eval_pairs=100,
)


def quick(settings: PipelineSettings) -> PipelineSettings:
    """A few steps of each stage on little data (a smoke test)."""
    def steps(train: TrainConfig, n: int, **extra) -> TrainConfig:
        return dataclasses.replace(train, max_steps=n, eval_interval=0, save_interval=0, **extra)

    return dataclasses.replace(settings, sft_train=steps(settings.sft_train, 20), sft_examples=200,
                               sft_extra_arithmetic=200, grpo_train=steps(settings.grpo_train, 4, batch_size=4),
                               dpo_train=steps(settings.dpo_train, 4), dpo={**settings.dpo, "num_pairs": 50},
                               eval_examples=10, grpo_eval_examples=10, dpo_eval_pairs=25)


def say(message: str) -> None:
    print(f"[finetune_figures] {message}", file=sys.stderr, flush=True)


def fresh_start(work: Path) -> Path:
    """A tokenizer trained on the tasks' chats and a random model: what SFT starts from without --init."""
    examples = make_dataset("all", 600, seed=0)
    tokenizer = train_tokenizer([chat_text(e.messages()) for e in examples], kind="bpe", vocab_size=512)
    tokenizer.save(work / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **START_MODEL))
    init = work / "init"
    init.mkdir()
    write_model_files(init, model, info={"stage": "random"}, tokenizer_dir=work / "tokenizer")
    return init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/finetune_figures")
    parser.add_argument("--init", help="start SFT from this checkpoint instead of a random model")
    parser.add_argument("--sft", help="skip SFT: start GRPO from this (SFT) checkpoint")
    parser.add_argument("--stages", default="sft,grpo,dpo")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    work = Path(args.work_dir)
    stages = tuple(s.strip() for s in args.stages.split(","))
    settings = quick(SETTINGS) if args.quick else SETTINGS

    def jsonable(options: dict) -> dict:  # a stage's config dataclass as its fields
        return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in options.items()}

    def schedule(train: TrainConfig) -> dict:
        return {key: getattr(train, key) for key in ("max_steps", "batch_size", "learning_rate", "min_lr")}

    result: dict = {"settings": {"model": START_MODEL, "sft": schedule(settings.sft_train),
                                 "grpo": {**jsonable(settings.grpo), **schedule(settings.grpo_train)},
                                 "dpo": {**jsonable(settings.dpo), **schedule(settings.dpo_train)}}}
    if args.sft:
        init, stages = resolve_checkpoint(args.sft), tuple(s for s in stages if s != "sft")
    elif "sft" not in stages:
        raise SystemExit("give --sft CKPT or include the sft stage")
    elif args.init:
        init = resolve_checkpoint(args.init)
    else:
        work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work / "init", ignore_errors=True)
        shutil.rmtree(work / "tokenizer", ignore_errors=True)
        init = fresh_start(work)
    result.update(run_pipeline(work, init, settings, stages, log=say))
    result["load_average_end"] = load_average()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
