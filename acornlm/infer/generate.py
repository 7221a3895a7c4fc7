"""The decoding loop: prefill the prompt once, then feed back one token per step through the KV cache.

    prompt ids --prefill--> logits of the last position --sample--> token --forward(token)--> ...

The KV cache is allocated once, at the exact size the request can reach, so no step allocates
or concatenates cache tensors. Each step runs the model on the single new token only, samples
from the last position only, and synchronises with the device once (to read the token ids).

Context limit: the model sees at most `max_position_embeddings` tokens. A longer prompt is
truncated from the left (with a warning), keeping its most recent tokens; generation then stops
when the next token would need a position beyond the context (or earlier, at max_new_tokens or
a stop token).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import torch

from acornlm.errors import ConfigError, GenerationError
from acornlm.infer.sampling import INVALID_TOKEN, SamplingParams, TokenSampler, numerical_failure
from acornlm.model import Transformer


def fit_prompt_to_context(prompt_ids: Sequence[int], context_length: int) -> list[int]:
    """The prompt, truncated from the left to the context length (with a warning) when longer."""
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: pass at least one token id (for example the end-of-text id)")
    if len(prompt_ids) > context_length:
        warnings.warn(
            f"prompt of {len(prompt_ids)} tokens is longer than the model's context of {context_length}; "
            f"keeping its last {context_length} tokens",
            stacklevel=3,
        )
        prompt_ids = prompt_ids[-context_length:]
    return prompt_ids


def new_token_budget(prompt_length: int, max_new_tokens: int, context_length: int) -> int:
    """How many tokens can be generated: every token but the last must be fed back into the model,
    so prompt_length + new_tokens - 1 <= context_length."""
    return max(0, min(max_new_tokens, context_length - prompt_length + 1))


@torch.inference_mode()
def generate_batch(model: Transformer, prompt_ids: Sequence[int], params: SamplingParams,
                   eos_ids: Iterable[int] = (), vocab_size: int | None = None) -> Iterator[list[int | None]]:
    """Decode `params.num_samples` continuations of one prompt together, as one batch.

    Yields, once per step, one entry per sample: the new token id, or None once that sample has
    ended (it produced one of `eos_ids` / `params.stop_token_ids`, which are not yielded).
    Stops when every sample has ended, after `params.max_new_tokens` steps, or when the context is full.
    `vocab_size` restricts sampling to the first ids (a model may pad its vocabulary past the tokenizer's).
    """
    context_length = model.config.max_position_embeddings
    prompt_ids = fit_prompt_to_context(prompt_ids, context_length)
    budget = new_token_budget(len(prompt_ids), params.max_new_tokens, context_length)
    batch_size = params.num_samples
    vocab_size = vocab_size or model.config.vocab_size
    device = model.device
    stop_ids = set(eos_ids) | set(params.stop_token_ids)

    sampler = TokenSampler(params, prompt_ids, batch_size, vocab_size, device)
    cache = model.new_cache(batch_size, len(prompt_ids) + budget - 1)
    finished = [False] * batch_size

    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device).expand(batch_size, -1)
    # prefill: every prompt token in one pass, logits of the last position only
    last = torch.full((batch_size,), len(prompt_ids) - 1, device=device)
    logits = model(prompt, cache, logits_at=last)[:, 0, :vocab_size]
    for step in range(budget):
        next_tokens = sampler(logits)  # [batch], still on the device
        step_tokens: list[int | None] = next_tokens.tolist()  # the one sync per step
        for row, token in enumerate(step_tokens):
            if token == INVALID_TOKEN and not finished[row]:
                raise GenerationError(numerical_failure(params))
            if finished[row] or token in stop_ids:
                finished[row] = True
                step_tokens[row] = None
        yield step_tokens
        if all(finished) or step == budget - 1:
            return
        logits = model(next_tokens[:, None], cache)[:, -1, :vocab_size]  # decode: one new token per row


def generate_tokens(model: Transformer, prompt_ids: Sequence[int], params: SamplingParams,
                    eos_ids: Iterable[int] = (), vocab_size: int | None = None) -> Iterator[int]:
    """Generate one continuation of the prompt, token by token (batch size 1).

    Ends at `params.max_new_tokens`, at a token in `eos_ids` or `params.stop_token_ids` (not yielded),
    or when the context is full. `params.num_samples` is ignored here; see `generate_batch`.
    """
    if params.num_samples != 1:
        params = replace(params, num_samples=1)
    for (token,) in generate_batch(model, prompt_ids, params, eos_ids, vocab_size):
        if token is None:
            return
        yield token
