"""Growing a model's vocabulary: new token rows for the embedding (and an untied output head).

Used when a tokenizer gains tokens (the chat tokens <think>, <tool_call>, ... of
`acornlm tokenizer add-chat-tokens`). The ids the model already knows keep their rows, bit for
bit, so every text without the new tokens gives the same logits as before. Each new row starts as
the mean of the existing rows (Hewitt 2021, "Initializing new word embeddings"): a random row
would give the new tokens arbitrary, often huge, logits, while the mean makes the model treat them
as an average token until fine-tuning teaches it what they mean.
"""

from __future__ import annotations

import dataclasses

import torch

from acornlm.model.transformer import Transformer


@torch.no_grad()
def resize_vocabulary(model: Transformer, vocab_size: int) -> Transformer:
    """A new model with `vocab_size` token rows: the old rows copied, new rows the mean of the old ones."""
    old_size = model.config.vocab_size
    if vocab_size < old_size:
        raise ValueError(f"cannot shrink the vocabulary from {old_size} to {vocab_size} tokens")
    grown = Transformer(dataclasses.replace(model.config, vocab_size=vocab_size)).to(model.dtype)
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = state[name]
        new = torch.cat([old, old.float().mean(dim=0, keepdim=True).to(old.dtype).expand(vocab_size - old_size, -1)])
        state[name] = new
    grown.load_state_dict(state)
    if grown.config.tie_word_embeddings:
        grown.lm_head.weight = grown.model.embed_tokens.weight
    return grown.eval()
