"""A scripted policy for tests of tool-using rollouts: a module with the model's interface (forward /
new_cache / config / device) whose logits force a reply chosen from the prompt's text, so the real
parse -> run -> append -> continue path runs with replies a random model would never write."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from acornlm.data.chat import IM_END_ID


class ScriptCache:
    """What the scripted policy remembers of one generate call: the replies it forces, the steps taken."""

    def __init__(self) -> None:
        self.replies: list[list[list[int]]] | None = None  # per row: the candidate replies' ids
        self.sampled: list[list[int]] = []                  # per row: the tokens fed back so far


class ScriptedPolicy(nn.Module):
    """Forces `script(prompt_text)`: a reply text, or a list of candidate replies with distinct first
    tokens, among which the first step samples uniformly (then the chosen one is forced). After the
    reply, <|im_end|>. `prompts` records the text of every prompt it continued."""

    def __init__(self, tokenizer, script, context: int = 2048) -> None:
        super().__init__()
        self.tokenizer, self.script = tokenizer, script
        self.config = SimpleNamespace(max_position_embeddings=context, vocab_size=tokenizer.vocab_size)
        self.prompts: list[str] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def new_cache(self, batch_size: int, max_length: int | None = None) -> ScriptCache:
        return ScriptCache()

    def forward(self, input_ids: torch.Tensor, cache: ScriptCache, logits_at=None) -> torch.Tensor:
        rows = input_ids.tolist()
        if cache.replies is None:  # prefill: every row holds the same prompt
            text = self.tokenizer.decode(rows[0])
            self.prompts.append(text)
            replies = self.script(text)
            candidates = [self.tokenizer.encode(r) + [IM_END_ID]
                          for r in (replies if isinstance(replies, list) else [replies])]
            assert len({c[0] for c in candidates}) == len(candidates), "candidates need distinct first tokens"
            cache.replies = [candidates] * len(rows)
            cache.sampled = [[] for _ in rows]
        else:
            for row, (token,) in enumerate(rows):
                cache.sampled[row].append(token)
        logits = torch.full((len(rows), 1, self.config.vocab_size), -1e4)
        for row, sampled in enumerate(cache.sampled):
            step = len(sampled)
            if step == 0:  # uniform over the candidates' first tokens
                logits[row, 0, [c[0] for c in cache.replies[row]]] = 0.0
                continue
            chosen = next(c for c in cache.replies[row] if c[0] == sampled[0])
            logits[row, 0, chosen[step] if step < len(chosen) else IM_END_ID] = 0.0
        return logits


def by_turn(*replies):
    """A script answering replies[k] to a prompt that already holds k tool-response turns."""
    return lambda text: replies[text.count("</tool_response><|im_end|>")]
