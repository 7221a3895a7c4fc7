"""Muon for the blocks' hidden matrices, AdamW for everything else (nanochat's split).

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") keeps one
momentum buffer per matrix and, instead of stepping along it, steps along its orthogonalisation:

    B ← μ·B + (1 − μ)·G                       momentum (an EMA of the gradient G), μ = 0.95
    U = (1 − μ)·G + μ·B                       Nesterov: the look-ahead momentum
    O = NewtonSchulz5(U) ≈ U V^T of U's SVD   every singular value pushed towards 1
    W ← W − lr·sqrt(max(1, rows/cols))·O

so each step moves every direction of the matrix by a similar amount, however small its gradient.
That suits the matrices inside the blocks (attention and MLP projections). Embeddings (a lookup:
each row sees only its own tokens' gradients), the output head (logits), norms and biases are not
such operators: they stay on AdamW, as in nanochat and the Muon paper. The update itself is
PyTorch's `torch.optim.Muon`; this module only decides which parameter goes where and makes the
two optimizers look like one to the Trainer.

Mixture-of-experts blocks: the router (`mlp.gate.weight`, [E, H]) produces logits over experts,
like a small output head, and the shared expert's sigmoid gate is a single row: both stay on
AdamW. The stacked expert weights ([E, 2I, H] and [E, H, I]) are 3-D, which torch.optim.Muon
refuses (orthogonalising the stack as one matrix would mix the experts): AdamW too. The shared
expert's Linear layers are ordinary hidden matrices: Muon. LoRA adapters stay on AdamW.

Learning rates: the Muon matrices peak at train.muon_lr (nanochat: 0.02), the AdamW parameters at
train.learning_rate; each param group carries `lr_scale` and the Trainer writes
`scheduled_lr × lr_scale` into it, so both follow the same warmup and cosine. Weight decay on the
Muon matrices is train.weight_decay × learning_rate / muon_lr: torch's Muon shrinks W by lr·λ per
step, so this shrinks them exactly as much per step as AdamW would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from acornlm.errors import ConfigError
from acornlm.train.config import TrainConfig

BLOCKS = "model.layers."  # where a Transformer keeps its blocks (also inside PPO's policy.)
ADAMW_MATRICES = ("mlp.gate.weight", "shared_expert_gate.weight")  # MoE router and shared-expert gate
MUON_MOMENTUM = 0.95
NS_STEPS = 5


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon trains `param`: a 2-D weight inside a block, not a router/gate, not a LoRA adapter."""
    return (BLOCKS in name and param.dim() == 2 and not name.endswith(ADAMW_MATRICES)
            and ".lora_" not in name)


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon's, AdamW's) trainable named parameters; a tied embedding/head matrix appears once (AdamW)."""
    muon, adamw = [], []
    for name, param in model.named_parameters():  # named_parameters() yields a tied tensor once
        if param.requires_grad:
            (muon if is_hidden_matrix(name, param) else adamw).append((name, param))
    return muon, adamw


class MuonWithAdamW:
    """Two optimizers that step as one: torch.optim.Muon for the hidden matrices, AdamW for the rest.

    It has what the Trainer and torch.amp.GradScaler use of an optimizer: `param_groups` (Muon's
    groups, then AdamW's; the same dicts, so writing an lr into them reaches both), `step`,
    `zero_grad`, `state_dict` / `load_state_dict` (both optimizers' states under "muon" and
    "adamw", so a resume is exact). Iterating over it yields the two optimizers, which is what
    torch.distributed.checkpoint's get/set_optimizer_state_dict take.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.Optimizer) -> None:
        self.muon = muon
        self.adamw = adamw

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter((self.muon, self.adamw))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Per-parameter state of both (Muon: one momentum buffer; AdamW: two moments)."""
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load both states; the groups keep this run's `lr_scale` (train.muon_lr may change on resume,
        as train.learning_rate may)."""
        if not isinstance(state, dict) or set(state) != {"muon", "adamw"}:
            raise ValueError("the saved optimizer state is not Muon + AdamW's (was the run trained with "
                             "--train.optimizer adamw?)")
        scales = [group["lr_scale"] for group in self.param_groups]
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        for group, scale in zip(self.param_groups, scales):
            group["lr_scale"] = scale


def build_muon(model: nn.Module, config: TrainConfig, adamw_groups: Callable[[list[nn.Parameter]], list[dict]],
               adamw_options: dict[str, Any]) -> MuonWithAdamW:
    """Muon (torch.optim.Muon, Keller Jordan's lr adjustment, Nesterov, 5 Newton-Schulz steps) for
    the hidden matrices and AdamW with `adamw_options` for the parameter groups `adamw_groups` makes
    of the others. The lrs set here are placeholders: the Trainer writes the scheduled ones."""
    muon_params, adamw_params = split_parameters(model)
    if not muon_params:
        raise ConfigError("train.optimizer=muon: the model has no trainable hidden matrices for Muon (LoRA "
                          "adapters, embeddings, norms and the head stay on AdamW); use --train.optimizer adamw")
    scale = config.muon_lr / config.learning_rate
    muon = torch.optim.Muon(
        [{"params": [param for _, param in muon_params], "lr_scale": scale}],
        lr=config.muon_lr,
        weight_decay=config.weight_decay / scale,
        momentum=MUON_MOMENTUM,
        nesterov=True,
        ns_steps=NS_STEPS,
        adjust_lr_fn="original",
    )
    groups = [group | {"lr_scale": 1.0} for group in adamw_groups([param for _, param in adamw_params])]
    adamw = torch.optim.AdamW(groups, lr=config.learning_rate, **adamw_options)
    return MuonWithAdamW(muon, adamw)
