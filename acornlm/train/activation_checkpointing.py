"""Activation checkpointing, applied to a built model from outside (the torchtitan pattern).

    model = Transformer(config)
    accelerate(model, mode="train")
    apply_activation_checkpointing(model, "full")     # the Trainer does this for --train.activation_checkpointing

Why: the backward pass needs the activations of the forward pass, and for a small model at a long
context they, not the weights, fill memory: minimind2-small at batch 8 x 512 in fp32 adds 2.8 GB of
activations to 0.4 GB of weights, gradients and AdamW moments (benchmarks/activation_checkpointing.py).
A checkpointed block keeps only its input; in the backward pass it runs its forward again
(torch.utils.checkpoint, non-reentrant) to get the rest back, then differentiates. The price is one
more forward pass of the block, about a third of the step's arithmetic.

    "full"       every block is recomputed: activation memory ~ one block's worth + every block's input
                 (8 x 512 above: 2.8 -> 1.0 GB, 0.80x the tokens/s)
    "selective"  every second block (0, 2, 4, ...) is recomputed: ~half the activation memory for ~half
                 the extra compute of "full" (2.8 -> 1.8 GB, 0.90x the tokens/s). torchtitan's other
                 flavour, per-op selective checkpointing (save matmul and attention outputs, recompute
                 element-wise ops), saved less here (2.8 -> 2.1 GB): the benchmark's `selective_op`.

How: like `acornlm.accel`, the block's class is swapped in place for a subclass whose `forward`
wraps the reference one, so parameter names and state dicts stay exactly the model file's (no
`_checkpoint_wrapped_module.` prefix in checkpoints or exports), and the accelerated kernels inside
the block (oneDNN products, hand-written backward passes) run unchanged in both passes.
Checkpointing applies only where gradients are recorded and no KV cache is passed: generation,
evaluation and scoring under no_grad run the plain forward. Dropout masks are the same in the
recomputation (torch restores the RNG state), and a mixture-of-experts block's load-balancing
loss keeps the value (and gradient) of the original forward pass: gradients equal the
un-checkpointed model's (tests/test_activation_checkpointing.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from acornlm.errors import ConfigError
from acornlm.model.moe import MoEFeedForward
from acornlm.model.transformer import Transformer

MODES = ("none", "full", "selective")
CheckpointMode = Literal["none", "full", "selective"]


class CheckpointedBlock:
    """Mixed in front of a transformer block's class: in training, its forward runs under
    torch.utils.checkpoint, so only the block's input is kept for the backward pass."""

    def forward(self, x: torch.Tensor, rope, cache=None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None or not torch.is_grad_enabled():  # generation / evaluation: nothing to keep
            return super().forward(x, rope, cache, attention_mask)
        moe = self.mlp if isinstance(self.mlp, MoEFeedForward) else None
        calls = 0

        def block(x: torch.Tensor, rope, attention_mask: torch.Tensor | None) -> torch.Tensor:
            """The reference forward. Its second call is the recomputation during backward, which
            would overwrite a mixture-of-experts layer's load-balancing loss with a fresh tensor
            (and a graph nobody differentiates): put back what was there."""
            nonlocal calls
            calls += 1
            kept = moe.aux_loss if moe is not None else None
            try:
                return super(CheckpointedBlock, self).forward(x, rope, None, attention_mask)
            finally:
                if moe is not None and calls > 1:
                    moe.aux_loss = kept

        return checkpoint(block, x, rope, attention_mask, use_reentrant=False)


_CHECKPOINTED: dict[type, type] = {}  # block class -> its checkpointed subclass


def checkpointed_class(cls: type) -> type:
    """`cls` with `CheckpointedBlock` in front (made once per class; itself if it already is one)."""
    if issubclass(cls, CheckpointedBlock):
        return cls
    if cls not in _CHECKPOINTED:
        name = f"Checkpointed{cls.__name__}"
        _CHECKPOINTED[cls] = type(name, (CheckpointedBlock, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _CHECKPOINTED[cls]  # so pickling finds it
    return _CHECKPOINTED[cls]


def plain_class(cls: type) -> type:
    """The block class a checkpointed class was made from (itself when it is not one)."""
    return next((base for base, made in _CHECKPOINTED.items() if made is cls), cls)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (`model.layers`) of every acornlm Transformer in `model` (the model
    itself, or e.g. the policy inside PPO's policy-with-value-head)."""
    return [block for module in model.modules() if isinstance(module, Transformer) for block in module.model.layers]


def checkpointed_blocks(mode: CheckpointMode, num_blocks: int) -> list[int]:
    """The indices of the blocks that `mode` recomputes."""
    if mode not in MODES:
        raise ConfigError(f"train.activation_checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "full":
        return list(range(num_blocks))
    if mode == "selective":
        return list(range(0, num_blocks, 2))
    return []


def apply_activation_checkpointing(model: nn.Module, mode: CheckpointMode) -> nn.Module:
    """Checkpoint the blocks of `model` that `mode` names (in place; "none" undoes it); returns `model`.

    Apply it before torch.compile and DDP/FSDP wrapping, as torchtitan does: the wrappers then see
    the checkpointed blocks.
    """
    blocks = blocks_of(model)
    chosen = set(checkpointed_blocks(mode, len(blocks)))
    if chosen and not blocks:
        raise ConfigError(f"train.activation_checkpointing={mode}: {type(model).__name__} has no acornlm "
                          "Transformer blocks to checkpoint; use --train.activation_checkpointing none")
    for index, block in enumerate(blocks):
        base = plain_class(type(block))
        block.__class__ = checkpointed_class(base) if index in chosen else base
    return model


def is_checkpointed(block: nn.Module) -> bool:
    return isinstance(block, CheckpointedBlock)
