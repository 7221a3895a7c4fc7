"""Supervised fine-tuning data: conversations -> token rows with assistant-only targets, as batches.

Interface (used by the SFT stage; DPO/distillation may reuse the pieces):

    from acornlm.data.sft import encode_conversations, SFTBatches, IGNORE_INDEX

    examples, stats = encode_conversations(tokenizer, conversations, max_tokens=257, truncation="truncate")
    print(stats.summary())          # kept / truncated / dropped, never silent
    batches = SFTBatches(examples, val_examples, batch_size=8, seed=0, packing=True, row_tokens=257)
    inputs, targets = batches.batch(step, micro_step)   # targets = IGNORE_INDEX off the assistant tokens

Truncation policy (`max_tokens` = train.seq_len + 1: a row's last token is only ever a target):

    truncate   an example longer than max_tokens is cut at the end, then back to its last trained
               token, so it ends inside an assistant reply; if the cut would leave no assistant
               token at all (the first prompt alone is too long), the example is dropped: the prompt
               is never cut.
    drop       every example longer than max_tokens is dropped.

Both count what they did (`EncodeStats`), and the stage prints it.

Batching: with `packing`, whole examples are laid one after another into rows of exactly
`row_tokens` tokens (an example never straddles two rows, so no reply loses its prompt; the rest
of a row is padding). Packed examples share a row and attend to each other, which costs a little
quality for a lot of speed on short chats. Without packing, each example is its own row, padded
to the longest row of its micro-batch. Padding is <|endoftext|> and never a target.

Like the pretraining loader, batches are a pure function of (step, micro_step): global step s
takes rows s*G .. s*G+G-1 (G = batch_size x grad_accum_steps x world_size) of an endless
sequence of epochs, each epoch a permutation of the rows drawn from PCG64([seed, epoch]); rank r
at micro-step a takes the slice [(a*world_size + r)*batch_size, +batch_size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from acornlm.data.chat import RenderedChat, render_chat
from acornlm.data.conversations import Conversation
from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the target of a position without loss (F.cross_entropy's default ignore_index)
TRUNCATION = ("truncate", "drop")


@dataclass
class EncodeStats:
    """What happened to the conversations on their way to token rows."""

    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    longest: int = 0
    max_tokens: int = 0
    target_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.kept:,} of {self.conversations:,} examples kept ({self.target_tokens:,} target tokens); "
                f"{self.truncated:,} truncated and {self.dropped_too_long:,} dropped as longer than "
                f"{self.max_tokens} tokens (longest: {self.longest})")


def truncate_example(example: RenderedChat, max_tokens: int) -> RenderedChat | None:
    """The example cut to at most `max_tokens` tokens, ending with its last trained token; None when
    no trained token would remain (the prompt alone does not fit)."""
    mask = example.loss_mask[:max_tokens]
    last_target = max((i for i, m in enumerate(mask) if m), default=-1)
    if last_target < 0:
        return None
    return RenderedChat(example.ids[:last_target + 1], mask[:last_target + 1])


def encode_conversations(tokenizer: Tokenizer, conversations: Sequence[Conversation], max_tokens: int,
                         truncation: str = "truncate") -> tuple[list[RenderedChat], EncodeStats]:
    """Render every conversation (ids + loss mask) and apply the truncation policy (module docstring)."""
    if truncation not in TRUNCATION:
        raise ConfigError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    if max_tokens < 2:
        raise ConfigError(f"examples need at least 2 tokens (an input and a target), got max_tokens={max_tokens}")
    stats = EncodeStats(max_tokens=max_tokens)
    examples = []
    for conversation in conversations:
        stats.conversations += 1
        example = render_chat(tokenizer, conversation.messages, tools=conversation.tools)
        stats.longest = max(stats.longest, len(example))
        if len(example) > max_tokens:
            example = truncate_example(example, max_tokens) if truncation == "truncate" else None
            if example is None:
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
        stats.kept += 1
        stats.target_tokens += example.num_targets
        examples.append(example)
    return examples, stats


def pack_examples(examples: Sequence[RenderedChat], row_tokens: int) -> list[list[RenderedChat]]:
    """Whole examples laid in order into rows of at most `row_tokens` tokens (next-fit packing)."""
    rows: list[list[RenderedChat]] = []
    used = row_tokens  # forces a new row for the first example
    for example in examples:
        if len(example) > row_tokens:
            raise DataError(f"an example of {len(example)} tokens does not fit a row of {row_tokens}; "
                            "encode with max_tokens <= row_tokens")
        if used + len(example) > row_tokens:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example)
    return rows


def row_tensors(rows: Sequence[Sequence[RenderedChat]], pad_id: int, length: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a micro-batch: each row's examples concatenated, padded to `length` (default:
    the longest row); targets are the next tokens where they are trained, IGNORE_INDEX elsewhere."""
    ids = [[token for example in row for token in example.ids] for row in rows]
    masks = [[m for example in row for m in example.loss_mask] for row in rows]
    length = length or max(len(row) for row in ids)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    trained = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(ids, masks)):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        trained[i, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    targets = tokens[:, 1:].masked_fill(~trained[:, 1:], IGNORE_INDEX)
    return tokens[:, :-1].contiguous(), targets.contiguous()


class SFTBatches:
    """The Trainer's batch source for SFT (see the module docstring for the batch rule).

    `tokens_per_step` is the number of real (non-padding) input tokens of the global batch of the
    step most recently requested: the Trainer reads it right after each step, for tokens/s.
    """

    def __init__(self, train: Sequence[RenderedChat], val: Sequence[RenderedChat], *, batch_size: int,
                 seed: int, row_tokens: int, packing: bool = False, pad_id: int = 0, grad_accum_steps: int = 1,
                 rank: int = 0, world_size: int = 1) -> None:
        if not train:
            raise DataError("no training examples are left after truncation; raise train.seq_len "
                            "or use shorter conversations")
        self.batch_size, self.seed, self.packing, self.pad_id = batch_size, seed, packing, pad_id
        self.row_tokens = row_tokens
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * grad_accum_steps * world_size
        self.train_rows = pack_examples(train, row_tokens) if packing else [[example] for example in train]
        # Without held-out conversations, validation falls back to the training rows.
        val = val or train
        self.val_rows = pack_examples(val, row_tokens) if packing else [[example] for example in val]
        self.tokens_per_step = self._global_tokens(0)

    def __len__(self) -> int:
        return len(self.train_rows)

    def _row_indices(self, step: int) -> np.ndarray:
        """Indices of the global batch's rows at `step`: positions in an endless run of shuffled epochs."""
        n = len(self.train_rows)
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs = positions // n
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            order = np.random.Generator(np.random.PCG64([self.seed, int(epoch)])).permutation(n)
            chosen = epochs == epoch
            indices[chosen] = order[positions[chosen] % n]
        return indices

    def _global_tokens(self, step: int) -> int:
        """Input tokens (padding excluded) of the global batch at `step`: each row feeds all but its last token."""
        return sum(sum(len(example) for example in self.train_rows[i]) - 1 for i in self._row_indices(step))

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self._row_indices(step)
        start = (micro_step * self.world_size + self.rank) * self.batch_size
        rows = [self.train_rows[i] for i in indices[start:start + self.batch_size]]
        if micro_step == 0:
            self.tokens_per_step = self._global_tokens(step)
        return row_tensors(rows, self.pad_id, self.row_tokens if self.packing else None)

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.val_rows)
        rows = [self.val_rows[(index * self.batch_size + k) % n] for k in range(self.batch_size)]
        return row_tensors(rows, self.pad_id, self.row_tokens if self.packing else None)
