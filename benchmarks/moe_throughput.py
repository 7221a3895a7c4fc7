"""Training throughput of the `minimind2-moe` preset vs a dense model of equal *active* size.

One training step (forward + backward + AdamW step, batch x seq tokens) of three models of the
same shape, timed round-robin in one process (common.time_interleaved). Candidates:

  moe               acornlm's MoE layer as shipped: experts stacked, slots sorted by expert,
                    one contiguous block per expert (acornlm/model/moe.py)
  dense_equal_active  the same model with a dense SwiGLU feed-forward of width
                    top_k x moe_intermediate_size + shared_expert_intermediate_size: the same
                    active parameters and FLOPs per token
  minimind_loop     REFERENCE ONLY, written here: MiniMind's MoE training path (model_minimind.py,
                    MiniMind2): every token repeated top_k times (repeat_interleave), then
                    `for i, expert: y[flat_idx == i] = expert(x[flat_idx == i])` with a boolean
                    mask per expert, weighted sum, plus the ungated shared expert

Prints one JSON object (tokens/s per candidate and the ratios; never asserts times).
Usage: python benchmarks/moe_throughput.py [--quick] [--threads N] [--layers L]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import common
import torch
import torch.nn.functional as F
from torch import nn

from acornlm.model import Transformer
from acornlm.model.moe import MoEFeedForward
from acornlm.train.optim import parameter_groups


class MiniMindLoopMoE(nn.Module):
    """REFERENCE ONLY: MiniMind2's MoE feed-forward training path (per-expert boolean masks).

    Holds the same weights as an acornlm MoEFeedForward (copied), so it computes the same function
    up to the shared expert's gate, which MiniMind does not have (here kept, for equal work).
    """

    def __init__(self, moe: MoEFeedForward) -> None:
        super().__init__()
        self.top_k, self.num_experts = moe.gate.top_k, moe.num_experts
        self.norm_topk_prob = moe.gate.norm_topk_prob
        self.gate = nn.Linear(moe.gate.weight.shape[1], self.num_experts, bias=False)
        self.gate.weight = nn.Parameter(moe.gate.weight.detach().clone())
        size = moe.experts.down_proj.shape[-1]
        self.experts = nn.ModuleList()
        for e in range(self.num_experts):
            expert = nn.ModuleDict({
                "gate_proj": nn.Linear(1, 1, bias=False), "up_proj": nn.Linear(1, 1, bias=False),
                "down_proj": nn.Linear(1, 1, bias=False)})
            expert["gate_proj"].weight = nn.Parameter(moe.experts.gate_up_proj[e, :size].detach().clone())
            expert["up_proj"].weight = nn.Parameter(moe.experts.gate_up_proj[e, size:].detach().clone())
            expert["down_proj"].weight = nn.Parameter(moe.experts.down_proj[e].detach().clone())
            self.experts.append(expert)
        self.shared_expert, self.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate

    @staticmethod
    def swiglu(expert: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        return expert["down_proj"](F.silu(expert["gate_proj"](x)) * expert["up_proj"](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, shape[-1])
        scores = F.softmax(self.gate(x), dim=-1)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        flat_idx = topk_idx.view(-1)
        xs = x.repeat_interleave(self.top_k, dim=0)
        y = torch.empty_like(xs)
        for i, expert in enumerate(self.experts):
            y[flat_idx == i] = self.swiglu(expert, xs[flat_idx == i]).to(y.dtype)
        y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(shape)


def training_step(model: nn.Module, ids: torch.Tensor, coef: float) -> callable:
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, foreach=True)

    def step() -> None:
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        aux = model.aux_loss() if hasattr(model, "aux_loss") else None
        if aux is not None:
            loss = loss + coef * aux
            model.clear_aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    parser.add_argument("--layers", type=int, default=2, help="layers (the preset has 8; fewer keep it fast)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, seq, repeats = (2, 128, 3) if args.quick else (4, 256, 5)

    config = dataclasses.replace(common.preset_config("minimind2-moe"), num_hidden_layers=args.layers,
                                 max_position_embeddings=seq + 1)
    active_width = config.num_experts_per_tok * config.moe_intermediate_size + config.shared_expert_intermediate_size
    dense_config = dataclasses.replace(config, num_experts=0, intermediate_size=active_width,
                                       moe_intermediate_size=0, num_shared_experts=0, shared_expert_intermediate_size=0)
    torch.manual_seed(0)
    moe = Transformer(config)
    dense = Transformer(dense_config)
    loop = Transformer(config)
    loop.load_state_dict(moe.state_dict())
    for layer in loop.model.layers:
        layer.mlp = MiniMindLoopMoE(layer.mlp)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the reference computes the same function
        moe.eval(), loop.eval()
        parity = (moe(ids[:, :32]) - loop(ids[:, :32])).abs().max().item()
        moe.train(), loop.train()
    coef = config.router_aux_loss_coef
    candidates = {"moe": training_step(moe, ids, coef), "dense_equal_active": training_step(dense, ids, coef),
                  "minimind_loop": training_step(loop, ids, coef)}
    times = common.time_interleaved(candidates, repeats)
    tokens = batch * seq
    results = {name: {**common.summarize(t), "tokens_per_s": tokens / min(t)} for name, t in times.items()}
    print(json.dumps({
        "benchmark": "moe_throughput",
        "shape": {"preset": "minimind2-moe", "layers": args.layers, "hidden": config.hidden_size,
                  "experts": config.num_experts, "top_k": config.num_experts_per_tok,
                  "moe_intermediate": config.moe_intermediate_size,
                  "shared_intermediate": config.shared_expert_intermediate_size,
                  "dense_intermediate": active_width, "batch": batch, "seq": seq},
        "params": {"moe_total": moe.num_params(), "moe_active": moe.active_params(), "dense": dense.num_params()},
        "reference_max_abs_logit_diff": parity,
        "results": results,
        "moe_vs_dense_equal_active": results["moe"]["tokens_per_s"] / results["dense_equal_active"]["tokens_per_s"],
        "moe_vs_minimind_loop": results["moe"]["tokens_per_s"] / results["minimind_loop"]["tokens_per_s"],
        "environment": common.environment(),
    }, indent=2))


if __name__ == "__main__":
    main()
