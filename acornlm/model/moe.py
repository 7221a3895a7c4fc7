"""Mixture-of-Experts feed-forward: a router sends each token to its top-k SwiGLU experts.

    scores  = softmax(x W_gate^T)                    [tokens, E]   router probabilities
    w, idx  = topk(scores, k)                        (renormalised to sum 1 when norm_topk_prob)
    y       = Σ_j w_j · expert_{idx_j}(x)  (+ σ(x W_sg^T) · shared_expert(x))

Parameter names and shapes are transformers 5.x Qwen3-MoE / Qwen2-MoE's, so a checkpoint maps
onto those classes by name:

    mlp.gate.weight               [E, H]        the router (a plain weight, not an nn.Linear: LoRA
                                                 leaves routing alone, as PEFT does on transformers 5)
    mlp.experts.gate_up_proj      [E, 2·I, H]   the experts' gate and up projections, stacked
    mlp.experts.down_proj         [E, H, I]     the experts' down projections, stacked
    mlp.shared_expert.{gate,up,down}_proj.weight   one always-on SwiGLU expert (Qwen2-MoE)
    mlp.shared_expert_gate.weight [1, H]         its learned sigmoid gate

Dispatch is batched: the (token, slot) pairs are sorted by expert, gathered into one contiguous
block per expert, each expert multiplies its block (a loop over experts, never over tokens),
and the weighted results are scattered back with one index_add. benchmarks/moe_throughput.py
compares it with a dense feed-forward of the same active size and with MiniMind's per-expert
masking loop.

The load-balancing loss of the latest training forward pass is kept on the layer
(`MoEFeedForward.aux_loss`); `Transformer.aux_loss()` sums the layers and the Trainer adds
`router_aux_loss_coef × aux` to the training loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acornlm.model.config import ModelConfig


def load_balancing_loss(scores: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                        per_sequence: bool) -> torch.Tensor:
    """Switch Transformer load-balancing loss: aux = E · Σ_i f_i · P_i.

    f_i is the fraction of the tokens' k routing slots that went to expert i (Σ f_i = 1; no gradient),
    P_i the mean router probability of expert i. Perfectly balanced routing gives aux = 1; a router
    that sends everything to one expert with certainty gives E. `scores` [B, T, E] and
    `expert_ids` [B, T, k]: token-level (Switch, Qwen) pools every token of the batch;
    sequence-level (DeepSeek-V2's and MiniMind's `seq_aux`) computes it per sequence and averages.
    """
    batch, seq, k = expert_ids.shape
    if not per_sequence:
        scores, expert_ids = scores.reshape(1, batch * seq, -1), expert_ids.reshape(1, batch * seq, k)
    counts = torch.zeros(scores.shape[0], num_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, expert_ids.flatten(1), torch.ones_like(expert_ids.flatten(1), dtype=scores.dtype))
    fraction = counts / (expert_ids.shape[1] * k)  # f_i per sequence (or for the whole batch)
    mean_prob = scores.mean(dim=1)  # P_i
    return num_experts * (fraction * mean_prob).sum(dim=-1).mean()


class TopKRouter(nn.Module):
    """Router: softmax(x W^T) over the experts, then the k largest (renormalised if norm_topk_prob)."""

    linear = staticmethod(F.linear)  # x W^T (acornlm.accel swaps in its CPU product)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., H] -> (scores [..., E] in fp32, top-k weights [..., k] in x's dtype, expert ids [..., k])."""
        scores = F.softmax(self.linear(x, self.weight).float(), dim=-1)
        weights, expert_ids = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return scores, weights.to(x.dtype), expert_ids


class StackedExperts(nn.Module):
    """E SwiGLU experts, down(silu(gate(x)) · up(x)), with their weights stacked into 3-D tensors."""

    linear = staticmethod(F.linear)  # x W^T (acornlm.accel swaps in its CPU product)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts, size = config.num_experts, config.moe_intermediate_size
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(experts, config.hidden_size, size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids and weights [N, k] -> Σ_j weights[:, j] · expert_{ids[:, j]}(x), [N, H].

        Sort the N·k slots by expert (stable, so the order inside an expert is the token order),
        gather the tokens once, run each expert on its contiguous block, scale by the routing
        weight and scatter-add back to the tokens.
        """
        k = expert_ids.shape[-1]
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_of_slot = order // k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync per layer
        blocks = x[token_of_slot].split(counts)
        # unbind: one view per expert whose backward stacks the gradients (indexing would add a
        # full-size zero tensor per expert).
        outputs = []
        for block, gate_up, down in zip(blocks, self.gate_up_proj.unbind(0), self.down_proj.unbind(0)):
            if block.shape[0] == 0:
                continue
            gate, up = self.linear(block, gate_up).chunk(2, dim=-1)
            outputs.append(self.linear(F.silu(gate) * up, down))
        if not outputs:  # no tokens at all
            return torch.zeros_like(x)
        out = torch.cat(outputs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token_of_slot, out)


class SharedExpert(nn.Module):
    """An always-on SwiGLU expert: down(silu(gate(x)) · up(x)) (Qwen2-MoE `shared_expert`)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """The MoE block that replaces the dense feed-forward when model.num_experts > 0 (see the module doc)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.per_sequence_aux = config.aux_loss_type == "sequence"
        self.gate = TopKRouter(config)
        self.experts = StackedExperts(config)
        if config.num_shared_experts:
            self.shared_expert = SharedExpert(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.aux_loss: torch.Tensor | None = None  # of the latest forward pass in training mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        scores, weights, expert_ids = self.gate(x)
        if self.training:
            self.aux_loss = load_balancing_loss(scores, expert_ids, self.num_experts, self.per_sequence_aux)
        rows = x.reshape(-1, hidden)
        y = self.experts(rows, expert_ids.reshape(rows.shape[0], -1), weights.reshape(rows.shape[0], -1))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(rows)) * self.shared_expert(rows)
        return y.view(batch, seq, hidden)

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """N(0, std) for the router and the experts' input projections, N(0, residual_std) for their
        down projections (they write into the residual stream, like o_proj); the shared expert's
        Linear layers are initialised by the Transformer with the others."""
        nn.init.normal_(self.gate.weight, mean=0.0, std=std)
        nn.init.normal_(self.experts.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.experts.down_proj, mean=0.0, std=residual_std)

    def active_params(self) -> int:
        """Parameters one token uses: router, k routed experts, the shared expert and its gate."""
        expert = (self.experts.gate_up_proj[0].numel() + self.experts.down_proj[0].numel())
        active = self.gate.weight.numel() + self.gate.top_k * expert
        if self.shared_expert is not None:
            active += sum(p.numel() for p in self.shared_expert.parameters()) + self.shared_expert_gate.weight.numel()
        return active

    def total_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
