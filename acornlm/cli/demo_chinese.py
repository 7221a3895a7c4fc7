"""The Chinese half of `acornlm demo --corpus tang-poems`: which tokenizer suits Chinese (char against
BPE at equal wall clock), poems prompted by a title before and after training with the share that has
a regular form, and the chats at the end, in Chinese.

    tokenizers  char vs byte-level BPE: bytes per token, and val bits/byte after the same short training
    samples     "《春晓》" -> a poem; the share of 4 or 8 lines of 5 or 7 characters (acornlm.data.poetry)
    chat        你是谁？ / 三加五等于多少？ / 写一首题为《春晓》的五言绝句。 after SFT -> GRPO -> DPO
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from acornlm.cli.demo_budget import estimate_steps, say
from acornlm.cli.demo_data import ensure_data, ensure_tokenizer
from acornlm.data.poetry import poem_form, read_poems, regular_share
from acornlm.data.tasks import use_poems
from acornlm.eval.tasks import replies
from acornlm.infer.api import LanguageModel
from acornlm.model import ModelConfig
from acornlm.train.config import TrainConfig
from acornlm.train.pretrain import run_pretrain

# Titles the samples start from (famous ones; the model completes author and lines).
TITLES = ("春曉", "靜夜思", "登高", "春望", "江雪", "月夜", "山居秋暝", "送別")
CHAT_QUESTIONS = ("你是谁？", "三加五等于多少？", "四十二减十七等于多少？", "写一首题为《春晓》的五言绝句。")
CHAR_VOCAB = 12000  # an upper bound: the Tang poems use 9,696 distinct characters, all of which fit
BPE_VOCAB = 8192


def title_prompt(title: str) -> str:
    """How a poem starts in the corpus documents (acornlm.data.poetry): its title line."""
    return f"《{title}》"


def compare_tokenizers(corpus_dir: Path, out_dir: Path, model_fields: dict[str, Any], train_fields: dict[str, Any],
                       minutes_each: float, device: str, bpe_vocab: int = BPE_VOCAB) -> tuple[str, list[dict[str, Any]]]:
    """Train a char and a BPE tokenizer, prepare the data with each, pretrain the same model on each for
    `minutes_each`, and return the kind with the lower val bits/byte and every figure.

    Bits per byte does not depend on the tokenizer, so it is a fair comparison; at equal wall clock, the
    tokenizer whose tokens carry more text per step (BPE) competes with the one whose vocabulary is
    smaller and whose tokens are easier to predict (char).
    """
    train_inputs = [corpus_dir / "train"]
    results = []
    for kind, vocab in (("char", CHAR_VOCAB), ("bpe", bpe_vocab)):
        tok_dir, data_dir = out_dir / f"tokenizer-{kind}", out_dir / f"data-{kind}"
        tokenizer = ensure_tokenizer(tok_dir, kind, vocab, train_inputs)
        meta = ensure_data(train_inputs, [corpus_dir / "val"], tok_dir, data_dir, tokenizer)
        model_config = ModelConfig(**{**model_fields, "vocab_size": tokenizer.vocab_size})
        config = TrainConfig(**{**train_fields, "max_minutes": minutes_each, "device": device})
        steps = estimate_steps(model_config, config, minutes_each, device)
        config = dataclasses.replace(config, max_steps=steps, warmup_steps=max(1, min(config.warmup_steps, steps // 10)),
                                     eval_interval=steps, save_interval=steps)
        run_dir = out_dir / f"compare-{kind}"
        shutil.rmtree(run_dir, ignore_errors=True)
        say(f"      {kind}: {tokenizer.vocab_size} tokens, {meta['val']['bytes'] / meta['val']['tokens']:.2f} "
            f"bytes/token on val; {steps} steps in {minutes_each:g} min")
        summary = run_pretrain(data_dir, run_dir, model_config, config)
        results.append({"kind": kind, "vocab_size": tokenizer.vocab_size,
                        "bytes_per_token": round(meta["val"]["bytes"] / meta["val"]["tokens"], 3),
                        "steps": steps, "val_bpb": summary.get("val_bpb")})
        say(f"      {kind}: val {summary.get('val_bpb', float('nan')):.4f} bits/byte after {steps} steps")
    best = min(results, key=lambda r: r["val_bpb"] if r["val_bpb"] is not None else float("inf"))
    return best["kind"], results


def poems_from_titles(lm: LanguageModel, titles: tuple[str, ...], max_new_tokens: int, seed: int,
                      samples: int = 4) -> dict[str, list[str]]:
    """`samples` poems per title (temperature 0.8, top-k 50), each cut at the end of its document."""
    poems = {}
    for title in titles:
        texts = lm.generate(title_prompt(title), max_new_tokens=max_new_tokens, temperature=0.8, top_k=50,
                            seed=seed, num_samples=samples, stop=["《"])
        poems[title] = [title_prompt(title) + text for text in texts]
    return poems


def form_figures(poems: dict[str, list[str]]) -> dict[str, Any]:
    every = [poem for group in poems.values() for poem in group]
    return {"poems": len(every), "regular_share": regular_share(every), "forms": [poem_form(p) for p in every]}


def chat_answers(checkpoint: Path) -> list[tuple[str, str]]:
    """The fine-tuned model's greedy replies to the Chinese questions, as `acornlm chat` would give them."""
    lm = LanguageModel.from_checkpoint(checkpoint, device="cpu")
    return list(zip(CHAT_QUESTIONS, replies(lm, CHAT_QUESTIONS, [96] * len(CHAT_QUESTIONS))))


def load_poem_task(corpus_dir: Path) -> int:
    """Give the zh_poem task the corpus's regular poems; returns how many."""
    return use_poems(read_poems([corpus_dir]))


def chinese_section(comparison: list[dict[str, Any]] | None, forms: dict[str, Any] | None,
                    figures: dict[str, Any] | None) -> list[str]:
    """The Chinese demo's part of summary.md: the tokenizer comparison, the poems' forms, the chat."""
    lines = ["## 分词器：字 vs BPE (tokenizer: char vs BPE, equal wall clock)", "",
             "| tokenizer | vocabulary | bytes/token (val) | steps | val bits/byte |", "|---|---|---|---|---|"]
    for row in comparison or []:
        bpb = f"{row['val_bpb']:.4f}" if row["val_bpb"] is not None else "n/a"
        lines.append(f"| {row['kind']} | {row['vocab_size']:,} | {row['bytes_per_token']:.2f} | {row['steps']} | {bpb} |")
    if forms:
        lines += ["", "## 格律 (regular form: 4 or 8 lines of 5 or 7 characters)", "",
                  "| | poems | regular share |", "|---|---|---|",
                  f"| before training | {forms['before']['poems']} | {forms['before']['regular_share']:.1%} |",
                  f"| after training | {forms['after']['poems']} | {forms['after']['regular_share']:.1%} |"]
    if figures and figures.get("chat"):
        lines += ["", "## 对话 (chat after fine-tuning, greedy)", ""]
        for question, answer in figures["chat"]:
            lines += [f"- 用户：{question}", f"  模型：{answer}"]
    return lines + [""]
