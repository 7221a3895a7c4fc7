"""Log-likelihood scoring: how probable the model finds a continuation after a context.

Every multiple-choice benchmark and every perplexity figure comes down to one quantity,

    log p(continuation | context) = sum over the continuation's tokens t_i of
                                    log softmax(logits(context, t_1 .. t_{i-1}))[t_i]

computed here in batches by `score_continuations`. `encode_pair` tokenizes a (context,
continuation) pair exactly as lm-evaluation-harness does, so a score here and a score there
are the same number; `rolling_windows` cuts a long text into windows for perplexity.

    pairs = [encode_pair(tok, "Question: 2+2?\\nAnswer:", " 4")]
    [scored] = score_continuations(model, pairs)    # scored.logprob, scored.greedy
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from acornlm.errors import ConfigError
from acornlm.model import Transformer
from acornlm.tokenizer import Tokenizer

TokenPair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Scored:
    """The score of one continuation.

    Attributes:
        logprob: sum of log p(token | everything before it) over the continuation's tokens (nats).
        greedy: whether greedy decoding would have produced the continuation (each token the argmax).
        tokens: the number of continuation tokens.
        truncated: the context was cut from the left to fit the model's window.
    """

    logprob: float
    greedy: bool
    tokens: int
    truncated: bool


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> TokenPair:
    """Token ids of a (context, continuation) pair, by lm-evaluation-harness's convention.

    The whole string is encoded once and the context's tokens are cut off its front, so the
    continuation is tokenized as it would be in running text; spaces at the end of the context
    move to the continuation (" A" is one token in most BPE vocabularies, "A" after "Answer: " is not).
    An empty context is the end-of-text token: the continuation then starts a fresh document.
    """
    if not continuation:
        raise ConfigError("a continuation to score is empty")
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class _Job:
    """One forward input (context + continuation minus its last token) and what to read from it."""

    inputs: tuple[int, ...]
    reads: list[tuple[int, int, list[int]]]  # (request index, first position, target ids)


def _plan(pairs: Sequence[TokenPair], window: int, share_prefix: int) -> tuple[list[_Job], list[bool]]:
    """Group requests by identical forward inputs: the answer letters " A" .. " D" after one
    prompt need a single forward pass, not four. Inputs that start alike (the same k-shot examples)
    are ordered next to each other, longest first, so batches share their prefix."""
    jobs: dict[tuple[int, ...], _Job] = {}
    truncated = []
    for index, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ConfigError(f"request {index}: the continuation has no tokens")
        if not context:
            raise ConfigError(f"request {index}: the context has no tokens (start it with the end-of-text token)")
        if len(continuation) > window:
            raise ConfigError(f"request {index}: a continuation of {len(continuation)} tokens cannot be scored "
                              f"by a model whose context holds {window}")
        inputs = (list(context) + list(continuation))[:-1]
        truncated.append(len(inputs) > window)
        inputs = tuple(inputs[-window:])
        job = jobs.setdefault(inputs, _Job(inputs, []))
        job.reads.append((index, len(inputs) - len(continuation), list(continuation)))

    def order(job: _Job) -> tuple:
        long_enough = share_prefix and len(job.inputs) >= 2 * share_prefix
        return (job.inputs[:share_prefix] if long_enough else (), -len(job.inputs))

    return sorted(jobs.values(), key=order), truncated


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every row shares."""
    shortest = min(len(row) for row in rows)
    for position in range(shortest):
        token = rows[0][position]
        if any(row[position] != token for row in rows):
            return position
    return shortest


def _hidden_states(model: Transformer, batch: list[_Job], share_prefix: int,
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """Hidden states [B, T - skip, hidden] of a right-padded batch, and `skip`, the positions left out.

    When every row starts with the same `skip` >= share_prefix tokens (k-shot examples), they go
    through the model once, with batch 1, and the rows continue from a copy of that KV cache:
    five shots shared by sixteen questions cost one forward pass instead of sixteen.
    """
    width = max(len(job.inputs) for job in batch)
    first = min(read[1] for job in batch for read in job.reads)
    skip = min(common_prefix([job.inputs for job in batch]), first) if share_prefix and len(batch) > 1 else 0
    if skip < max(share_prefix, 1):
        skip = 0
    ids = torch.zeros(len(batch), width - skip, dtype=torch.long)
    for row, job in enumerate(batch):
        ids[row, :len(job.inputs) - skip] = torch.tensor(job.inputs[skip:])
    if not skip:
        return model.hidden_states(ids.to(device)), 0
    prefix = model.new_cache(1, skip)
    model.hidden_states(torch.tensor([batch[0].inputs[:skip]], device=device), prefix)
    cache = model.new_cache(len(batch), width)
    cache.keys[:, :, :, :skip] = prefix.keys
    cache.values[:, :, :, :skip] = prefix.values
    cache.length = skip
    return model.hidden_states(ids.to(device), cache), skip


@torch.inference_mode()
def score_continuations(model: Transformer, pairs: Sequence[TokenPair], batch_size: int = 16,
                        window: int | None = None, share_prefix: int = 64,
                        progress: Callable[[int], None] | None = None) -> list[Scored]:
    """log p(continuation | context) and "is it the greedy choice" for every (context ids,
    continuation ids) pair, in the order given.

    Inputs are sorted longest first and right-padded in batches of `batch_size` (padding after
    a row's last token cannot change its logits: attention is causal). A prefix of at least
    `share_prefix` tokens common to a whole batch is computed once (0 turns this off). Only the
    positions that predict a continuation token go through the output head. A context longer than
    the model's window (`window`, default max_position_embeddings) loses tokens from its left;
    `Scored.truncated` says so. `progress(n)` is called after each batch with the number of
    requests it scored.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    window = window or model.config.max_position_embeddings
    jobs, truncated = _plan(pairs, window, share_prefix)
    results: list[Scored | None] = [None] * len(pairs)
    device = next(model.parameters()).device
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        hidden, skip = _hidden_states(model, batch, share_prefix, device)  # [B, T - skip, hidden]
        # The positions each row needs: from its earliest continuation to its end.
        rows, positions = [], []
        for row, job in enumerate(batch):
            first = min(read[1] for read in job.reads)
            rows += [row] * (len(job.inputs) - first)
            positions += range(first - skip, len(job.inputs) - skip)
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
        logprobs = model.lm_head(picked).float().log_softmax(dim=-1)  # [N, vocab]
        offset = 0
        for job in batch:
            first = min(read[1] for read in job.reads)
            for index, position, targets in job.reads:
                at = offset + position - first
                block = logprobs[at:at + len(targets)]
                target = torch.tensor(targets, device=block.device)
                logprob = block.gather(1, target[:, None]).sum().item()
                greedy = bool((block.argmax(dim=-1) == target).all())
                results[index] = Scored(logprob, greedy, len(targets), truncated[index])
            offset += len(job.inputs) - first
        if progress is not None:
            progress(sum(len(job.reads) for job in batch))
    return results  # type: ignore[return-value]


def rolling_windows(token_ids: Sequence[int], prefix_id: int, window: int, stride: int) -> list[TokenPair]:
    """(context, continuation) pairs that score every token of a long text exactly once.

    Sliding-window perplexity: the text is preceded by `prefix_id` (end-of-text: a fresh document),
    and each window of at most `window` inputs scores the next `stride` tokens, seeing up to
    `window - stride` tokens before them. stride == window gives disjoint windows (fast, less
    context); a smaller stride gives each scored token more context at the cost of more compute.
    The last window always reaches back a full `window`.
    """
    if not 1 <= stride <= window:
        raise ConfigError(f"the stride must be between 1 and the window ({window}), got {stride}")
    sequence = [prefix_id, *token_ids]
    pairs = []
    for begin in range(0, len(token_ids), stride):
        end = min(begin + stride, len(token_ids))
        first_input = max(0, end - window)
        # inputs sequence[first_input:end] predict tokens begin..end-1 (sequence[begin+1:end+1])
        pairs.append((sequence[first_input:begin + 1], list(token_ids[begin:end])))
    return pairs
