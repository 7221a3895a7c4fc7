"""A reward model: the Transformer with a one-number head, r(prompt + answer) -> a score.

The layout is Hugging Face's `LlamaForSequenceClassification` / `Qwen3ForSequenceClassification`:
the decoder stack under its usual names (`model.embed_tokens.weight`, `model.layers.0...`), no
`lm_head`, and `score`, a hidden -> 1 linear layer without bias. The reward of a sequence is the
score of its last real token's final hidden state: with causal attention that is the one position
that has read the whole prompt and answer. Rows are right-padded, so each row's `length` says where
its last real token is (transformers finds it as the rightmost token that is not `pad_token_id`).

A reward checkpoint is a normal acornlm checkpoint (config.json + model.safetensors + tokenizer
files) whose weights hold `score.weight` and whose config.json records `"stage": "reward"` and
`"head": "score"`, so a policy checkpoint is never mistaken for a reward model.

Interface (the reward-model stage trains it; PPO and GRPO read it):

    from acornlm.train.reward_model import load_reward_model, check_reward_tokenizer

    check_reward_tokenizer("runs/reward", policy_tokenizer)      # ConfigError when the token ids differ
    rm = load_reward_model("runs/reward", device="cpu")           # a run dir or a checkpoint dir
    rewards = rm.score_texts(tokenizer, [ids_a, ids_b])          # float32 [2], no grad
    rewards = rm(input_ids, lengths)                              # [B], with grad (training)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acornlm.data.preferences import pad_rows
from acornlm.errors import CheckpointError, ConfigError
from acornlm.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_weight_shapes,
    checkpoint_model_config,
    read_checkpoint_config,
    read_weight_shapes,
    read_weights,
    resolve_checkpoint,
)
from acornlm.model.config import ModelConfig
from acornlm.model.transformer import Transformer, rope_frequencies
from acornlm.tokenizer import Tokenizer, load_tokenizer

REWARD_STAGE = "reward"
REWARD_HEAD = "score"  # the head's name in config.json and in the weights (transformers' name)


class RewardModel(Transformer):
    """A Transformer whose output head is `score` (hidden -> 1): input_ids [B, T] -> rewards [B].

    It is a Transformer subclass so that everything that runs a Transformer (the Trainer, DDP,
    `accelerate`, checkpoint writing, the MoE load-balancing loss) runs it unchanged; only the
    head differs. There is no `lm_head`: a reward model never predicts tokens, and an unused head
    would cost memory and make DDP complain about parameters without gradients.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        del self.lm_head  # (a tied head is the embedding, which stays)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=config.initializer_range)  # as transformers does

    def init_rope(self) -> None:
        """Transformer's RoPE tables, with the device read off the embedding (there is no lm_head)."""
        c = self.config
        if c.position == "rope":
            device = self.model.embed_tokens.weight.device
            device = "cpu" if device.type == "meta" else device
            cos, sin = rope_frequencies(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Rewards [B]: the score of each row's last real token, at position lengths - 1.

        Rows are right-padded; `lengths` [B] counts each row's real tokens (None: every row is full).
        Only the picked positions go through the head, so padding never reaches a reward, and
        causal attention keeps it from changing the real tokens' hidden states.
        """
        hidden = self.hidden_states(input_ids)  # [B, T, hidden]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if lengths is None:
            last = torch.full_like(rows, hidden.shape[1] - 1)
        else:
            last = lengths.to(hidden.device) - 1
        return self.score(hidden[rows, last]).squeeze(-1)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12·L·H·Q·T as for the Transformer, where N now excludes the
        embedding lookups even when tied (there is no output head that multiplies by it)."""
        n = self.active_params() - self.model.embed_tokens.weight.numel()
        if hasattr(self.model, "embed_positions"):
            n -= self.model.embed_positions.weight.numel()
        c = self.config
        return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len

    @classmethod
    def from_policy(cls, policy: Transformer, seed: int) -> RewardModel:
        """A reward model on `policy`'s decoder stack (its weights copied; its lm_head dropped) with a
        new score head drawn from N(0, initializer_range) by a generator seeded with `seed`, so every
        rank and every rerun starts from the same head whatever the global random state."""
        with torch.device("meta"):  # no memory until the policy's weights are copied in
            model = cls(policy.config)
        model = model.to_empty(device=policy.device)
        model.init_rope()
        state = {name: tensor for name, tensor in policy.state_dict().items() if not name.startswith("lm_head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {"score.weight"} or unexpected:
            raise CheckpointError(f"the policy's weights do not fit a reward model of its config: missing "
                                  f"{sorted(set(missing) - {'score.weight'})[:5]}, unexpected {unexpected[:5]}")
        generator = torch.Generator().manual_seed(seed)
        head = torch.randn(model.score.weight.shape, generator=generator) * policy.config.initializer_range
        with torch.no_grad():
            model.score.weight.copy_(head)
        return model.train(policy.training)

    @torch.no_grad()
    def score_texts(self, tokenizer: Tokenizer, sequences: Sequence[Sequence[int] | str],
                    batch_size: int = 16) -> torch.Tensor:
        """The reward of each sequence (token ids, or a text the tokenizer encodes), float32 [N] on the
        model's device, computed without gradients in eval mode (the model's mode is restored).

        Sequences are batched by length (less padding), right-padded with `tokenizer.eot_id`. A
        sequence that is empty, longer than the model's context or holds ids outside its
        vocabulary is a ConfigError: a reward for a cut or garbled sequence would be silently wrong.
        """
        rows = [tokenizer.encode(s) if isinstance(s, str) else [int(t) for t in s] for s in sequences]
        limit, vocab = self.config.max_position_embeddings, self.config.vocab_size
        for index, row in enumerate(rows):
            if not row:
                raise ConfigError(f"sequence {index} is empty: a reward model scores at least one token")
            if len(row) > limit:
                raise ConfigError(f"sequence {index} has {len(row)} tokens, more than the reward model's context "
                                  f"of {limit} (model.max_position_embeddings); shorten the prompt or completion")
            if min(row) < 0 or max(row) >= vocab:
                raise ConfigError(f"sequence {index} holds token ids outside the reward model's vocabulary "
                                  f"[0, {vocab}): was it encoded with another tokenizer?")
        rewards = torch.empty(len(rows), dtype=torch.float32, device=self.device)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start:start + max(1, batch_size)]
                ids = pad_rows([rows[i] for i in chunk], tokenizer.eot_id).to(self.device)
                lengths = torch.tensor([len(rows[i]) for i in chunk], device=self.device)
                rewards[torch.tensor(chunk, device=self.device)] = self(ids, lengths).float()
        finally:
            self.train(was_training)
        return rewards


def is_reward_checkpoint(info: dict[str, Any]) -> bool:
    """Whether a checkpoint's config.json describes a reward model (`"head": "score"`)."""
    return info.get("head") == REWARD_HEAD or info.get("stage") == REWARD_STAGE


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """The reward model of a run directory or checkpoint directory, in eval mode, weights via safetensors.

    A policy (language-model) checkpoint is a ConfigError that says how to get a reward model;
    weights that do not match config.json are a CheckpointError naming the field, checked against
    the file's header before any memory is allocated (as `load_model` does).
    """
    ckpt = resolve_checkpoint(path)
    info = read_checkpoint_config(ckpt)
    if not is_reward_checkpoint(info):
        raise ConfigError(f"{ckpt} is not a reward model (its config.json records stage "
                          f"{info.get('stage')!r} and no score head); train one with acornlm train reward")
    config = checkpoint_model_config(info, ckpt / CONFIG_FILE)
    weights = ckpt / WEIGHTS_FILE
    shapes = read_weight_shapes(weights)
    with torch.device("meta"):
        model = RewardModel(config)
    check_weight_shapes(model, shapes, weights, ckpt / CONFIG_FILE)
    state = read_weights(weights, device)
    model = model.to_empty(device=device)
    model.init_rope()  # derived buffers are not in the file
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match {ckpt / CONFIG_FILE}: {exc}") from exc
    return model.eval()


def reward_model_tokenizer_problem(reward_dir: str | Path, tokenizer: Tokenizer) -> str | None:
    """Why the reward model in `reward_dir` cannot score the token ids of `tokenizer`, or None.

    A reward model reads token ids; ids made by another tokenizer mean other text, so its scores
    would be noise. The fingerprint of the tokenizer files shipped with the checkpoint decides.
    """
    ckpt = resolve_checkpoint(reward_dir)
    theirs = load_tokenizer(ckpt).fingerprint
    if theirs == tokenizer.fingerprint:
        return None
    return (f"the reward model {ckpt} uses another tokenizer (fingerprint {theirs[:16]}) than the policy "
            f"({tokenizer.fingerprint[:16]}): it would read the policy's token ids as other text. Train the "
            "reward model from a checkpoint with the policy's tokenizer (e.g. the SFT run the policy starts from)")


def check_reward_tokenizer(reward_dir: str | Path, tokenizer: Tokenizer) -> None:
    """ConfigError unless the reward model in `reward_dir` uses `tokenizer` (see the function above)."""
    problem = reward_model_tokenizer_problem(reward_dir, tokenizer)
    if problem is not None:
        raise ConfigError(problem)
