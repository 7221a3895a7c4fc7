"""`acornlm demo`: the whole pipeline on the embedded Shakespeare corpus, as `make demo` runs it.

fetch corpus -> train BPE tokenizer -> prepare data -> sample from the untrained model ->
pretrain for a wall-clock budget -> sample again from the same prompts -> HF export ->
fine-tune on synthetic tasks (SFT -> GRPO -> DPO, demo_finetune.py) -> summary.md + loss curve ->
the report card of every stage (OUT/report/report.html, acornlm.eval.report).
Each step is the same function the individual commands call; this file only wires them together.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from acornlm.cli.demo_budget import choose_threads, estimate_steps, say, step_seconds
from acornlm.cli.demo_chinese import (
    BPE_VOCAB,
    TITLES,
    chat_answers,
    chinese_section,
    compare_tokenizers,
    form_figures,
    load_poem_task,
    poems_from_titles,
    title_prompt,
)
from acornlm.cli.demo_data import ensure_data, ensure_tokenizer
from acornlm.cli.demo_finetune import check_finetune_options, figure_lines, run_finetune, summary_section
from acornlm.data.poetry import CORPORA as POETRY
from acornlm.data.poetry import fetch_poetry
from acornlm.errors import ConfigError
from acornlm.eval.report import build_report, write_export, write_samples
from acornlm.files import atomic_write_text
from acornlm.model import ModelConfig, Transformer
from acornlm.presets import load_preset
from acornlm.train.config import TrainConfig

PROMPTS = ("Romeo.\n", "Juliet.\nO Romeo, ", "King Henry.\n")
SAMPLING = "temperature 0.8, top-k 50"


def sample_all(lm, prompts: tuple[str, ...], max_new_tokens: int, seed: int) -> dict[str, str]:
    return {p: lm.generate(p, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed + i)
            for i, p in enumerate(prompts)}


def print_samples(title: str, samples: dict[str, str]) -> None:
    say(f"\n===== {title} =====")
    for prompt, text in samples.items():
        say(f"--- prompt: {prompt!r}\n{prompt}{text}\n")


def write_summary(path: Path, model_config: ModelConfig, train_config: TrainConfig, summary: dict[str, Any],
                  before: dict[str, str], after: dict[str, str], export: str = "",
                  finetune: list[str] | None = None) -> None:
    """A short markdown report card of the run."""
    def fmt(value: Any, spec: str = ".4f") -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        "# acornlm demo run", "",
        "| metric | value |", "|---|---|",
        f"| parameters | {summary.get('params', 0) / 1e6:.2f} M |",
        f"| steps | {summary.get('steps')} |",
        f"| tokens seen | {summary.get('tokens_seen', 0):,} |",
        f"| tokens/s | {fmt(summary.get('tokens_per_s'), ',.0f')} |",
        f"| MFU (vs measured matmul peak) | {fmt(summary.get('mfu'), '.1%')} |",
        f"| final val loss | {fmt(summary.get('val_loss'))} |",
        f"| final val bits per byte | {fmt(summary.get('val_bpb'))} |",
        f"| wall time | {fmt(summary.get('wall_time_s'), '.0f')} s |",
        "", "![loss curve](run/loss_curve.png)", "",
        "## Export", "", "```", export or "not exported", "```", "",
        *(finetune or []),
        "## Model", "", "```json", json.dumps(model_config.to_dict(), indent=2), "```", "",
        "## Training", "", "```json", json.dumps(dataclasses.asdict(train_config), indent=2), "```", "",
        f"## Samples ({SAMPLING})", "",
    ]
    for prompt in before:
        lines += [f"### Prompt `{prompt!r}`", "", "Before training:", "", "```", prompt + before[prompt], "```",
                  "", "After training:", "", "```", prompt + after[prompt], "```", ""]
    atomic_write_text(path, "\n".join(lines))


def export_for_transformers(run_dir: Path, hf_dir: Path) -> str:
    """Export the trained model with acornlm.export.hf; verification needs transformers (the export extra).
    The summary goes to RUN/export.json for the report card."""
    from acornlm.export.hf import describe_export, export_hf

    summary = export_hf(run_dir, hf_dir, force=True)
    write_export(run_dir, summary)
    report = describe_export(summary)
    say(report)
    return report


def demo(out: str = "runs/demo", minutes: float = 10.0, preset: str = "cpu-demo", vocab_size: int = 0,
         corpus: str | None = None, device: str = "auto", max_new_tokens: int = 160, seed: int = 1337,
         finetune: str = "full", finetune_minutes: float = 12.0, lora_rank: int = 16,
         eval_examples: int = 200, threads: int = 0, compare_minutes: float = 1.0) -> dict:
    """Run the whole pipeline on the embedded Shakespeare corpus (what `make demo` does).

    Fetches the corpus, trains a byte-level BPE tokenizer, prepares the data, prints samples from
    the untrained model, pretrains for MINUTES of wall clock, prints samples from the same prompts
    again, exports it to OUT/hf as a transformers model (verified in transformers when it is
    installed). Then it fine-tunes on offline synthetic tasks (arithmetic, reverse, count, sort,
    identity) for FINETUNE_MINUTES: SFT -> GRPO on arithmetic -> DPO on pairs where the right answer
    beats a wrong one, printing held-out accuracy before and after each stage (runs in OUT/sft,
    OUT/grpo, OUT/dpo; `acornlm chat --ckpt OUT/dpo` talks to the result). It writes OUT/summary.md,
    OUT/run/loss_curve.png and, last, the report card of every stage: OUT/report/report.html
    (self-contained; report.md next to it; `acornlm report` writes the same for any runs). About
    18-20 minutes on 2 quiet CPU cores with the defaults (more when they are busy). The corpus,
    tokenizer and prepared data in OUT are reused when present; the runs are replaced.

    Args:
        out: Directory for everything the demo writes (corpus/, tokenizer/, data/, run/, hf/, sft/, grpo/, dpo/, summary.md, report/).
        minutes: Wall-clock pretraining budget in minutes; the cosine schedule is sized to end with it.
        preset: Model and training preset (see acornlm/presets/).
        vocab_size: BPE vocabulary size; 0 = 4096 (English), 8192 (a Chinese corpus).
        corpus: Train on this corpus (files or a folder) instead of the embedded Shakespeare texts; or a Chinese corpus by name: tang-poems (唐诗; the demo then compares char and BPE tokenizers, prompts poems by title and counts their regular forms, and fine-tunes on Chinese chats), song-ci or shijing.
        device: "auto", "cpu", "cuda" or "mps".
        max_new_tokens: Length of each sample.
        seed: Seed for the model initialisation, the data order and the samples.
        finetune: After pretraining: "full" (SFT updates every weight), "lora" (SFT trains LoRA adapters only; GRPO and DPO continue from the merged model) or "none" (stop after the export).
        finetune_minutes: Wall-clock budget of the fine-tuning stages and their evaluations, in minutes.
        lora_rank: Rank of the LoRA adapters with --finetune lora (alpha = 2 x rank, every linear layer of the blocks).
        eval_examples: Held-out questions per task behind the SFT accuracies (GRPO's arithmetic figure uses 2.5 x as many, DPO's half as many pairs per task).
        threads: CPU threads for torch; 0 = whichever of one per core and a single thread trains faster right now (a single thread wins when other work keeps the cores busy).
        compare_minutes: With a Chinese corpus: minutes of pretraining with each tokenizer (char, BPE) to compare their val bits/byte at equal wall clock; the better one is kept.
    """
    from acornlm.data.shakespeare import fetch_shakespeare
    from acornlm.infer.api import LanguageModel
    from acornlm.tokenizer import load_tokenizer
    from acornlm.train.pretrain import run_pretrain

    if minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    check_finetune_options(finetune, finetune_minutes, eval_examples, lora_rank)
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = automatic), got {threads}")
    stages = 7 if finetune == "none" else 8
    started = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    chinese = corpus in POETRY
    if chinese and compare_minutes <= 0:
        raise ConfigError(f"--compare_minutes must be > 0, got {compare_minutes}")
    preset_data = load_preset(preset)
    say(f"[1/{stages}] corpus")
    if chinese:
        corpus_dir = fetch_poetry(corpus, out_dir / "corpus")
    else:
        corpus_dir = Path(corpus) if corpus else fetch_shakespeare(out_dir / "corpus")
    train_inputs = [corpus_dir / "train"] if (corpus_dir / "train").is_dir() else [corpus_dir]

    comparison = None
    if chinese:
        say(f"[2/{stages}] tokenizer: char against byte-level BPE, {compare_minutes:g} minute(s) of training each")
        kind, comparison = compare_tokenizers(corpus_dir, out_dir, preset_data.get("model", {}),
                                              {**preset_data.get("train", {}), "seed": seed}, compare_minutes, device,
                                              bpe_vocab=vocab_size or BPE_VOCAB)
        say(f"      keeping {kind}: the lower val bits/byte at equal wall clock")
        tok_dir, data_dir = out_dir / f"tokenizer-{kind}", out_dir / f"data-{kind}"
        tokenizer = load_tokenizer(tok_dir)
        say(f"[3/{stages}] data: {data_dir} (prepared for the comparison)")
    else:
        vocab_size = vocab_size or 4096
        say(f"[2/{stages}] tokenizer: byte-level BPE, {vocab_size} tokens")
        tok_dir = out_dir / "tokenizer"
        tokenizer = ensure_tokenizer(tok_dir, "bpe", vocab_size, train_inputs)
        say(f"[3/{stages}] data")
        data_dir = out_dir / "data"
        val = [corpus_dir / "val"] if (corpus_dir / "val").is_dir() else None
        ensure_data(train_inputs, val, tok_dir, data_dir, tokenizer)

    model_config = ModelConfig(**{**preset_data.get("model", {}), "vocab_size": tokenizer.vocab_size})
    train_fields = {**preset_data.get("train", {}), "max_minutes": minutes, "seed": seed, "device": device}
    train_config = TrainConfig(**train_fields)
    num_threads = choose_threads(threads, lambda: step_seconds(model_config, train_config, device))
    if num_threads != torch.get_num_threads():
        torch.set_num_threads(num_threads)
        say(f"      using {num_threads} torch thread(s)" + ("" if threads else
            ": faster than one per core right now (other work keeps the cores busy)"))
    steps = estimate_steps(model_config, train_config, minutes, device)
    train_config = dataclasses.replace(train_config, max_steps=steps,
                                       warmup_steps=min(train_config.warmup_steps, max(1, steps // 10)))
    say(f"      {steps} optimizer steps fit in {minutes:g} minutes")

    say(f"[4/{stages}] samples before training")
    torch.manual_seed(seed)
    untrained = LanguageModel(Transformer(dataclasses.replace(model_config)).eval(), tokenizer)
    if chinese:
        poems_before = poems_from_titles(untrained, TITLES, max_new_tokens, seed)
        before = {title_prompt(t): group[0][len(title_prompt(t)):] for t, group in poems_before.items()}
    else:
        before = sample_all(untrained, PROMPTS, max_new_tokens, seed)
    print_samples("before training", before)

    say(f"[5/{stages}] pretraining {preset} for {minutes:g} minutes")
    run_dir = out_dir / "run"
    if run_dir.exists():
        say(f"      replacing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    summary = run_pretrain(data_dir, run_dir, model_config, train_config)

    say(f"[6/{stages}] samples after training")
    lm = LanguageModel.from_checkpoint(run_dir, device="cpu")
    forms = None
    if chinese:
        poems_after = poems_from_titles(lm, TITLES, max_new_tokens, seed)
        after = {title_prompt(t): group[0][len(title_prompt(t)):] for t, group in poems_after.items()}
        forms = {"before": form_figures(poems_before), "after": form_figures(poems_after)}
        summary["poem_forms"] = forms
        summary["tokenizer_comparison"] = comparison
    else:
        after = sample_all(lm, PROMPTS, max_new_tokens, seed)
    print_samples("after training", after)
    if forms:
        say(f"      regular form (4 or 8 lines of 5 or 7 characters): {forms['before']['regular_share']:.0%} of "
            f"{forms['before']['poems']} poems before training -> {forms['after']['regular_share']:.0%} after")
    write_samples(run_dir, [{"prompt": p, "before training": before[p], "after training": after[p]} for p in before],
                  f"{SAMPLING}, {max_new_tokens} new tokens, seed {seed}")

    say(f"[7/{stages}] export to Hugging Face transformers (verified by loading it back)")
    export = export_for_transformers(run_dir, out_dir / "hf")
    figures = None
    if finetune != "none":
        say(f"[8/8] fine-tuning on synthetic tasks for {finetune_minutes:g} minutes: SFT -> GRPO -> DPO")
        if chinese:
            say(f"      {load_poem_task(corpus_dir):,} regular poems for the zh_poem task")
        figures = run_finetune(out_dir, run_dir, model_config, finetune, finetune_minutes, eval_examples,
                               lora_rank, seed, device, language="zh" if chinese else "en")
        summary["finetune"] = figures
        if chinese:
            figures["chat"] = chat_answers(out_dir / "dpo")
    extra = chinese_section(comparison, forms, figures) if chinese else []
    write_summary(out_dir / "summary.md", model_config, train_config, summary, before, after, export,
                  extra + (summary_section(figures, out_dir) if figures else []))
    say(f"\nval loss {summary.get('val_loss')}, val bits/byte {summary.get('val_bpb')}, "
        f"{summary.get('tokens_per_s', 0):,.0f} tokens/s")
    if figures:
        say("\n".join(figure_lines(figures)))
        for question, answer in figures.get("chat", []):
            say(f"      用户：{question}\n      模型：{answer}")
    stage_runs = [run_dir] + ([out_dir / stage for stage in ("sft", "grpo", "dpo") if (out_dir / stage).is_dir()]
                              if figures else [])  # a run of --finetune none leaves older stages out
    card = build_report(stage_runs, out_dir / "report")
    say(f"wrote {out_dir / 'summary.md'} and the report card {card} in {(time.time() - started) / 60:.1f} minutes")
    return summary
