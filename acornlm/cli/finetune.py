"""`acornlm train sft`, `acornlm lora merge`, `acornlm eval tasks` and `acornlm data synth`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from acornlm.errors import ConfigError
from acornlm.model.lora import LoraConfig
from acornlm.train.config import TrainConfig, stage_defaults
from acornlm.train.signals import StopOnSignal

# The stage's defaults are data: acornlm/train/defaults/sft.yaml.
DEFAULT_SFT_TRAIN = TrainConfig(**stage_defaults("sft")["train"])
DEFAULT_LORA = LoraConfig()


def sft(data: str | None = None, init: str | None = None, out: str | None = None,
        train: TrainConfig = DEFAULT_SFT_TRAIN, lora: LoraConfig = DEFAULT_LORA, data_format: str = "auto",
        val_data: str | None = None, val_fraction: float = 0.05, packing: bool = False,
        truncation: str = "truncate", resume: bool | Literal["auto"] = False) -> None:
    """Supervised fine-tuning on chat data: the loss is on the assistant's tokens only.

    Full fine-tuning by default; `--lora.rank 8` trains LoRA adapters only (saved in the PEFT
    layout next to the base weights in every checkpoint). Try it offline on synthetic tasks:
    `acornlm data synth --out data/tasks.jsonl`, then `--data data/tasks.jsonl`, then
    `acornlm eval tasks --ckpt OUT`. Ctrl-C or SIGTERM finishes the current step, saves a checkpoint
    and exits with status 130 / 143; `--resume auto` continues the run (a second Ctrl-C aborts at once).

    Args:
        data: Chat data: a .jsonl/.json file, a folder of them, or several separated by commas. Formats: messages (OpenAI/TRL), minimind, sharegpt, alpaca (auto-detected); tool calls, tool results, a "tools" list and reasoning (reasoning_content or <think>) are read and trained (see docs/agents.md).
        init: The pretrained checkpoint or run directory to start from (not needed with --resume).
        out: Run directory for checkpoints, metrics.jsonl and loss_curve.png.
        train: Optimisation, schedule, evaluation and checkpointing; train.seq_len is the longest example (in tokens, minus one).
        lora: LoRA adapters instead of full fine-tuning (lora.rank > 0).
        data_format: auto, messages, minimind, sharegpt or alpaca.
        val_data: Held-out chat data for the validation loss; default: a val_fraction of --data.
        val_fraction: Share of --data held out for validation when --val_data is not given.
        packing: Pack several whole examples into each row of train.seq_len tokens (faster on short chats) instead of one padded example per row.
        truncation: What to do with an example longer than train.seq_len: "truncate" (cut the end of the conversation; dropped when the first prompt alone does not fit) or "drop". Both are counted and reported.
        resume: true or auto: continue the run in OUT from checkpoints/latest (weights, adapters, optimizer,
            data position, RNG), or start fresh from --init when OUT has no checkpoint yet (one command line
            for the first start and every restart); false: refuse an OUT that already holds a run. A bare
            `--resume` means true.
            Ctrl-C or SIGTERM stops a run after the current step with a checkpoint (exit status 130 / 143).
    """
    from acornlm.cli.train import exit_if_stopped, format_summary
    from acornlm.train.sft import run_sft

    if data is None:
        raise ConfigError("--data is required: chat data as .jsonl (try `acornlm data synth --out tasks.jsonl`)")
    if out is None:
        raise ConfigError("--out is required: the run directory for checkpoints and metrics")
    with StopOnSignal():  # Ctrl-C / SIGTERM: finish the step, save, exit 130 / 143
        summary = run_sft(data, init, out, train, lora, data_format=data_format, val_data=val_data,
                          val_fraction=val_fraction, packing=packing, truncation=truncation, resume=resume)
    if summary["rank"] == 0:
        print(format_summary(summary), file=sys.stderr)
        print(f"trainable parameters {summary['trainable_params']:,} of {summary['params']:,} "
              f"({summary['trainable_params'] / summary['params']:.2%})", file=sys.stderr)
    exit_if_stopped(summary)


def lora_merge(ckpt: str | None = None, out: str | None = None) -> None:
    """Fold a checkpoint's LoRA adapter into its base weights and save an ordinary checkpoint.

    The merged model gives the same outputs as base + adapter, without the adapter's extra work
    per token, and loads everywhere a checkpoint does (generate, serve, export).

    Args:
        ckpt: A checkpoint (or run directory) holding adapter_model.safetensors and adapter_config.json.
        out: Directory for the merged checkpoint (must not exist yet, or be empty).
    """
    from acornlm.model.checkpoint import CONFIG_FILE, resolve_checkpoint, write_model_files
    from acornlm.model.lora import ADAPTER_CONFIG_FILE, load_model_with_adapter, merge_lora

    if ckpt is None:
        raise ConfigError("--ckpt is required: the LoRA checkpoint or run directory")
    if out is None:
        raise ConfigError("--out is required: the directory for the merged checkpoint")
    source = resolve_checkpoint(ckpt)
    if not (source / ADAPTER_CONFIG_FILE).is_file():
        raise ConfigError(f"{source} holds no LoRA adapter ({ADAPTER_CONFIG_FILE}); nothing to merge")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty; choose a new --out for the merged checkpoint")
    model, info = load_model_with_adapter(source)
    merge_lora(model)
    keep = {k: v for k, v in info.items() if k not in ("format", "version", "model", "lora")}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_model_files(out_dir, model, info={**keep, "merged_from": str(source)}, tokenizer_dir=source)
    print(f"merged {source} into {out_dir / CONFIG_FILE}", file=sys.stderr)


def load_poems(tasks: list[str], poems: str | None) -> None:
    """Give zh_poem its poems from --poems; ConfigError when it is asked for without them."""
    from acornlm.data.poetry import read_poems
    from acornlm.data.tasks import use_poems

    if poems is not None:
        count = use_poems(read_poems([poems]))
        print(f"{count:,} regular poems from {poems} for zh_poem", file=sys.stderr)
    elif "zh_poem" in tasks:
        raise ConfigError("the zh_poem task needs --poems DIR: a poetry corpus (acornlm data fetch tang-poems --out DIR)")


def eval_tasks(ckpt: str | None = None, tasks: str = "all", n: int = 50, seed: int = 0, device: str = "auto",
               show: int = 0, json_output: bool = False, poems: str | None = None) -> None:
    """Exact-match accuracy on held-out synthetic tasks, answering greedily with the chat template.

    Tasks: arithmetic, reverse, count, sort, identity (group en, or all); zh_identity, zh_arithmetic,
    zh_poem (group zh; see `acornlm data synth`). A checkpoint with a LoRA adapter is evaluated with
    the adapter applied.

    Args:
        ckpt: Checkpoint or run directory.
        tasks: Comma-separated task names, or a group: all (= en), en, zh.
        poems: A poetry corpus folder (`acornlm data fetch tang-poems`) whose poems the zh_poem task asks for.
        n: Held-out examples per task.
        seed: Seed of the held-out examples (the held-out problems never occur in training data).
        device: auto, cpu, cuda, cuda:N or mps.
        show: Print this many (prompt, expected, reply) examples per task.
        json_output: Print the accuracies as one JSON object instead of a table.
    """
    from acornlm.data.tasks import parse_tasks
    from acornlm.eval.tasks import evaluate_tasks
    from acornlm.infer.api import LanguageModel, resolve_device
    from acornlm.model.checkpoint import resolve_checkpoint
    from acornlm.model.lora import load_model_with_adapter
    from acornlm.tokenizer import load_tokenizer

    if ckpt is None:
        raise ConfigError("--ckpt is required: the checkpoint or run directory to evaluate")
    if n < 1:
        raise ConfigError(f"--n must be a positive number of examples per task, got {n}")
    names = parse_tasks(tasks)
    load_poems(names, poems)
    source = resolve_checkpoint(ckpt)
    model, info = load_model_with_adapter(source, device=resolve_device(device))
    lm = LanguageModel(model, load_tokenizer(source), info)
    samples: dict[str, list[tuple[str, str, str]]] = {}
    accuracy = evaluate_tasks(lm, names, n=n, seed=seed, samples=samples)
    if json_output:
        print(json.dumps(accuracy))
        return
    width = max(len(name) for name in names)
    print(f"{'task':<{width}}  accuracy  (exact match, {n} held-out examples each, seed {seed})")
    for name, value in accuracy.items():
        print(f"{name:<{width}}  {value:8.3f}")
    print(f"{'mean':<{width}}  {sum(accuracy.values()) / len(accuracy):8.3f}")
    for name in names:
        for prompt, expected, text in samples[name][:show]:
            print(f"[{name}] {prompt!r} -> {text.strip()!r} (expected {expected!r})")


def synth(out: str | None = None, tasks: str = "all", n: int = 1000, seed: int = 0, split: str = "train",
          poems: str | None = None) -> None:
    """Write synthetic chat tasks as JSONL in the messages format (offline fine-tuning data).

    Each line is {"messages": [user, assistant], "task": name}. The "heldout" split never shares a
    question with "train" (it is what `acornlm eval tasks` measures on).

    Args:
        out: Output .jsonl file.
        tasks: Comma-separated task names (arithmetic, reverse, count, sort, identity; zh_identity, zh_arithmetic, zh_poem), or a group: all (= en), en, zh.
        n: Examples per task.
        seed: Seed; the same seed writes the same file.
        split: "train" or "heldout".
        poems: A poetry corpus folder (`acornlm data fetch tang-poems`): the titles and reference poems of zh_poem.
    """
    from acornlm.data.tasks import make_dataset, parse_tasks, write_jsonl

    if out is None:
        raise ConfigError("--out is required: the .jsonl file to write")
    load_poems(parse_tasks(tasks), poems)
    examples = make_dataset(tasks, n, seed, split)
    path = write_jsonl(examples, out)
    print(f"wrote {len(examples):,} conversations to {path}", file=sys.stderr)

