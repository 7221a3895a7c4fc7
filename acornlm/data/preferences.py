"""Preference data for DPO: a prompt, a preferred ("chosen") answer and a worse ("rejected") one.

Interface (used by the DPO stage):

    from acornlm.data.preferences import load_preference_pairs, encode_pair, synthetic_preference_pairs

    pairs, stats = load_preference_pairs(["data/dpo.jsonl"])        # PreferencePair(prompt, chosen, rejected)
    print(stats.summary())                                          # kept / skipped, and why
    encoded = encode_pair(tokenizer, pairs[0])                      # ids + loss masks of both answers

Formats people already have, detected from the first record of each file (or named with `data_format`):

    trl        {"prompt": ..., "chosen": ..., "rejected": ...}
               strings, or message lists: prompt [{role, content}, ...], chosen/rejected
               [{"role": "assistant", "content": ...}]. A string prompt is one user turn.
    minimind   {"chosen": [msgs], "rejected": [msgs]}: two whole conversations that share their
               prompt and differ in the last (assistant) message; also TRL's "implicit prompt".
    alpaca     LLaMA-Factory: {"instruction", "input"?, "chosen", "rejected", "system"?,
               "history"?: [[user, assistant], ...]}; the older {"output": [chosen, rejected]} too.
    sharegpt   LLaMA-Factory: {"conversations": [{from, value}, ...], "chosen": {from, value},
               "rejected": {from, value}, "system"?}

As for chat data (acornlm.data.conversations), a malformed file or record is a DataError naming
the file and line, while a well-formed pair that cannot be trained on is skipped and counted:
roles out of order or unsupported, or a pair whose chosen and rejected answers are identical
(it teaches nothing: its DPO gradient is zero). `on_identical="error"` makes identical answers
a DataError instead, for data that should never contain them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acornlm.data.chat import Message, message_problem, render_chat
from acornlm.data.conversations import (
    SHAREGPT_ROLES,
    content_text,
    data_files,
    describe_keys,
    iter_records,
    parse_alpaca,
    parse_messages,
    split_conversations,
)
from acornlm.data.tasks import TaskExample, make_dataset
from acornlm.errors import ConfigError, DataError
from acornlm.paths import as_path_list
from acornlm.tokenizer import Tokenizer

PREFERENCE_FORMATS = {
    "trl": '{"prompt", "chosen", "rejected"} as strings or message lists (TRL)',
    "minimind": '{"chosen": [msgs], "rejected": [msgs]} sharing all but the last message (MiniMind)',
    "alpaca": '{"instruction", "input"?, "chosen", "rejected", "system"?, "history"?} (LLaMA-Factory)',
    "sharegpt": '{"conversations": [{from, value}], "chosen": {from, value}, "rejected": {...}} (LLaMA-Factory)',
}
MAX_PROBLEM_EXAMPLES = 5


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: after `prompt` (messages ending with a user turn), `chosen` beats `rejected`."""

    prompt: tuple[tuple[str, str], ...]  # (role, content) pairs: hashable and immutable
    chosen: str
    rejected: str
    source: str = ""  # file:line

    @classmethod
    def from_messages(cls, prompt: Sequence[Message], chosen: str, rejected: str, source: str = "") -> PreferencePair:
        return cls(tuple((m["role"], m["content"]) for m in prompt), chosen, rejected, source)

    @property
    def prompt_messages(self) -> list[Message]:
        return [{"role": role, "content": content} for role, content in self.prompt]

    def messages(self, answer: str) -> list[Message]:
        """The whole conversation ending with `answer` as the assistant's turn."""
        return [*self.prompt_messages, {"role": "assistant", "content": answer}]


@dataclass
class PreferenceStats:
    """What loading kept and skipped; `summary()` is the line the DPO stage prints."""

    records: int = 0
    kept: int = 0
    identical: int = 0   # chosen == rejected
    bad_roles: int = 0   # roles out of order or unsupported, special tokens in a content
    formats: dict[str, str] = field(default_factory=dict)  # file -> format
    problems: list[str] = field(default_factory=list)      # the first few "file:line: reason"

    def skip(self, where: str, reason: str, identical: bool = False) -> None:
        if identical:
            self.identical += 1
        else:
            self.bad_roles += 1
        if len(self.problems) < MAX_PROBLEM_EXAMPLES:
            self.problems.append(f"{where}: {reason}")

    def summary(self) -> str:
        text = (f"{self.kept:,} of {self.records:,} preference pairs kept; skipped {self.identical:,} with "
                f"identical chosen and rejected answers and {self.bad_roles:,} with roles out of order or unsupported")
        if self.problems:
            text += " (first: " + "; ".join(self.problems[:2]) + ")"
        return text


# --- formats ---

def detect_preference_format(record: Any) -> str | None:
    """The preference format of one record, from its keys; None when no format fits."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "instruction" in keys and ({"chosen", "rejected"} <= keys or isinstance(record.get("output"), list)):
        return "alpaca"
    if "conversations" in keys and {"chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "trl"
    if {"chosen", "rejected"} <= keys and isinstance(record["chosen"], list):
        return "minimind"
    return None


def answer_text(value: Any, where: str, what: str) -> str:
    """An answer given as a string, one assistant message ({role, content} or {from, value}), or a list of one."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        messages = parse_messages(value, f"{where}: {what}", "from", "value", SHAREGPT_ROLES)
    else:
        messages = parse_messages(value, f"{where}: {what}")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{where}: {what!r} must be one assistant message (or a string), "
                        f"got roles {[m['role'] for m in messages]}")
    return messages[0]["content"]


def parse_preference(record: Any, data_format: str, where: str) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen text, rejected text) of one record; DataError when it does not fit."""
    if data_format not in PREFERENCE_FORMATS:
        raise DataError(f"unknown preference format {data_format!r}: choose auto or one of "
                        f"{', '.join(PREFERENCE_FORMATS)}")
    if detect_preference_format(record) != data_format:
        raise DataError(f"{where}: expected the {data_format} preference format "
                        f"{PREFERENCE_FORMATS[data_format]}, found {describe_keys(record)}")
    if data_format == "trl":
        prompt = record["prompt"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = parse_messages(prompt, f"{where}: 'prompt'")
        return messages, answer_text(record["chosen"], where, "chosen"), answer_text(record["rejected"], where,
                                                                                      "rejected")
    if data_format == "minimind":
        chosen = parse_messages(record["chosen"], f"{where}: 'chosen'")
        rejected = parse_messages(record["rejected"], f"{where}: 'rejected'")
        if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'chosen' and 'rejected' must each end with an assistant message")
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: 'chosen' and 'rejected' must share every message but the last "
                            "(the prompt), and differ only in the final assistant answer")
        return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    if data_format == "alpaca":
        messages = parse_alpaca({**record, "output": None}, where)
        if "chosen" in record:
            return (messages, content_text(record["chosen"], f"{where}: 'chosen'"),
                    content_text(record["rejected"], f"{where}: 'rejected'"))
        output = record["output"]
        if len(output) != 2:
            raise DataError(f"{where}: 'output' of a ranking record must be [chosen, rejected], got {len(output)} items")
        return messages, content_text(output[0], f"{where}: 'output'[0]"), content_text(output[1], f"{where}: 'output'[1]")
    messages = parse_messages(record["conversations"], f"{where}: 'conversations'", "from", "value", SHAREGPT_ROLES)
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": content_text(record["system"], f"{where}: 'system'")})
    return messages, answer_text(record["chosen"], where, "chosen"), answer_text(record["rejected"], where, "rejected")


def unknown_preference_format_error(where: str, record: Any) -> DataError:
    supported = "; ".join(f"{name}: {layout}" for name, layout in PREFERENCE_FORMATS.items())
    return DataError(f"{where}: cannot tell the preference format of this record (found {describe_keys(record)}). "
                     f"Supported formats: {supported}")


# --- loading ---

def load_preference_pairs(paths: Sequence[str | Path] | str | Path, data_format: str = "auto",
                          on_identical: str = "skip") -> tuple[list[PreferencePair], PreferenceStats]:
    """Every trainable preference pair of the .jsonl/.json files (or folders) in `paths`.

    See the module docstring for what is skipped and what is an error. DataError when no pair
    at all can be trained on.
    """
    if data_format != "auto" and data_format not in PREFERENCE_FORMATS:
        raise DataError(f"unknown preference format {data_format!r}: choose auto or one of "
                        f"{', '.join(PREFERENCE_FORMATS)}")
    if on_identical not in ("skip", "error"):
        raise DataError(f"on_identical must be 'skip' or 'error', got {on_identical!r}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    stats = PreferenceStats()
    pairs: list[PreferencePair] = []
    for path in data_files(paths):
        file_format = None if data_format == "auto" else data_format
        for where, record in iter_records(path):
            if file_format is None:
                file_format = detect_preference_format(record)
                if file_format is None:
                    raise unknown_preference_format_error(where, record)
                stats.formats[str(path)] = file_format
            stats.records += 1
            prompt, chosen, rejected = parse_preference(record, file_format, where)
            problem = message_problem([*prompt, {"role": "assistant", "content": chosen}]) or \
                message_problem([*prompt, {"role": "assistant", "content": rejected}])
            if problem:
                stats.skip(where, problem)
                continue
            if chosen == rejected:
                if on_identical == "error":
                    raise DataError(f"{where}: chosen and rejected answers are identical, so the pair teaches "
                                    "nothing; remove it, or let such pairs be skipped (--on_identical skip)")
                stats.skip(where, "identical chosen and rejected answers", identical=True)
                continue
            pairs.append(PreferencePair.from_messages(prompt, chosen, rejected, where))
            stats.kept += 1
    if not pairs:
        detail = f": {'; '.join(stats.problems)}" if stats.problems else ""
        raise DataError(f"no usable preference pair in {', '.join(map(str, paths))} "
                        f"({stats.records} records, {stats.identical + stats.bad_roles} skipped){detail}")
    return pairs, stats


# --- tokens ---

@dataclass(frozen=True)
class EncodedPair:
    """Token ids of prompt + chosen and prompt + rejected, each with a loss mask on the answer only.

    The mask covers the final assistant answer and its closing <|im_end|>; earlier assistant
    turns of a multi-turn prompt are context, not what the preference is about.
    """

    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    prompt_length: int

    @property
    def max_length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


def answer_only_mask(tokenizer: Tokenizer, prompt: Sequence[Message], answer: str) -> tuple[list[int], list[int], int]:
    """(ids, mask, prompt length) of prompt + answer, the mask on the answer tokens only.

    The prompt rendered on its own ends with "<|im_end|>\\n" before a special token, where BPE
    cannot merge across, so its ids are a prefix of the whole conversation's ids.
    """
    full = render_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    prompt_length = len(render_chat(tokenizer, prompt).ids)
    mask = [0] * prompt_length + full.loss_mask[prompt_length:]
    return full.ids, mask, prompt_length


def encode_pair(tokenizer: Tokenizer, pair: PreferencePair) -> EncodedPair:
    prompt = pair.prompt_messages
    chosen_ids, chosen_mask, prompt_length = answer_only_mask(tokenizer, prompt, pair.chosen)
    rejected_ids, rejected_mask, _ = answer_only_mask(tokenizer, prompt, pair.rejected)
    return EncodedPair(chosen_ids, chosen_mask, rejected_ids, rejected_mask, prompt_length)


def fit_pair(pair: EncodedPair, max_length: int) -> EncodedPair | None:
    """The pair cut to `max_length` tokens from the right (answers only), or None when even the
    prompt plus one answer token does not fit (the caller drops and counts it)."""
    if pair.max_length <= max_length:
        return pair
    if pair.prompt_length + 1 > max_length:
        return None
    return EncodedPair(pair.chosen_ids[:max_length], pair.chosen_mask[:max_length],
                       pair.rejected_ids[:max_length], pair.rejected_mask[:max_length], pair.prompt_length)


# --- synthetic pairs: the right answer beats a wrong one ---

def synthetic_preference_pairs(examples: Sequence[TaskExample], seed: int) -> list[PreferencePair]:
    """Pairs from synthetic task examples (acornlm.data.tasks): chosen = the correct answer,
    rejected = the answer of another example of the same task that differs from it (the right
    form, the wrong content), picked with a generator seeded by `seed`."""
    rng = random.Random(seed)
    answers: dict[str, list[str]] = {}
    for example in examples:
        answers.setdefault(example.task, []).append(example.answer)
    distinct = {task: len(set(values)) for task, values in answers.items()}
    pairs = []
    for example in examples:
        candidates = answers[example.task]
        if distinct[example.task] < 2:
            continue  # a task with a single answer (identity) cannot make a pair
        wrong = rng.choice(candidates)
        while wrong == example.answer:
            wrong = rng.choice(candidates)
        pairs.append(PreferencePair.from_messages(example.messages(with_answer=False), example.answer, wrong,
                                                  f"synthetic:{example.task}"))
    return pairs


# --- encoding pairs for training ---

def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Rows of different lengths as one [rows, longest] tensor, right-padded with `value`."""
    longest = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (longest - len(row)) for row in rows], dtype=torch.long)


def collate_sequences(sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
                      pad_id: int) -> dict[str, torch.Tensor]:
    """Next-token inputs and targets of token sequences: input_ids = seq[:-1], targets = seq[1:],
    mask = loss_mask[1:] (whether each target counts), right-padded (targets with -1)."""
    return {
        "input_ids": pad_rows([s[:-1] for s in sequences], pad_id),
        "targets": pad_rows([s[1:] for s in sequences], -1),
        "mask": pad_rows([m[1:] for m in masks], 0),
    }


@dataclass
class PairStats:
    """What encoding did to the preference pairs (never silent)."""

    pairs: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0

    def summary(self) -> str:
        return (f"{self.kept:,} of {self.pairs:,} pairs kept; {self.truncated:,} answers truncated and "
                f"{self.dropped_too_long:,} pairs dropped (prompt longer than the context)")


def encode_pair_splits(tokenizer: Tokenizer, train_pairs: Sequence[PreferencePair], val_pairs: Sequence[PreferencePair],
                       max_tokens: int, seq_len: int) -> tuple[list[EncodedPair], list[EncodedPair], PairStats]:
    """(train, validation, what encoding the training pairs kept and cut); DataError when either split
    has no pair that fits `max_tokens` (derived from train.seq_len, named in the message)."""
    stats = PairStats()
    train = encode_pairs(tokenizer, train_pairs, max_tokens, stats)
    val = encode_pairs(tokenizer, val_pairs, max_tokens)
    if not train or not val:
        raise DataError(f"no preference pair fits train.seq_len={seq_len} ({stats.summary()}); "
                        "raise train.seq_len or use shorter prompts")
    return train, val, stats


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[PreferencePair], max_tokens: int,
                 stats: PairStats | None = None) -> list[EncodedPair]:
    """Token ids and answer masks of every pair, answers cut to `max_tokens`, too-long prompts dropped."""
    stats = stats if stats is not None else PairStats()
    encoded = []
    for pair in pairs:
        stats.pairs += 1
        full = encode_pair(tokenizer, pair)
        fitted = fit_pair(full, max_tokens)
        if fitted is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += fitted is not full
        stats.kept += 1
        encoded.append(fitted)
    return encoded


def dpo_pairs(data: str | Path | Sequence[str | Path] | None, tasks: str | None, num_pairs: int,
              val_data: str | Path | Sequence[str | Path] | None, val_fraction: float, data_format: str,
              on_identical: str, seed: int) -> tuple[list[PreferencePair], list[PreferencePair], str]:
    """(train pairs, validation pairs, a line describing them) from files or synthetic tasks."""
    if data is not None:
        pairs, stats = load_preference_pairs(as_path_list(data), data_format, on_identical)
        description = stats.summary()
        if val_data is not None:
            return pairs, load_preference_pairs(as_path_list(val_data), data_format, on_identical)[0], description
        train, val = split_conversations(pairs, val_fraction, seed)  # any sequence splits the same way
        return train, val or train, description
    if tasks is None:
        raise ConfigError("--data is required (preference pairs as .jsonl), or --tasks for synthetic pairs "
                          "(the correct answer of acornlm's synthetic tasks beats a wrong one)")
    train = synthetic_preference_pairs(make_dataset(tasks, num_pairs, seed, "train"), seed)
    val = synthetic_preference_pairs(make_dataset(tasks, max(num_pairs // 10, 8), seed, "heldout"), seed + 1)
    return train, val, f"{len(train):,} synthetic pairs from tasks {tasks} (+{len(val):,} held out)"
