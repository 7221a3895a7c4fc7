"""The losses every training stage shares, each named by its formula.

    next_token_loss        pretraining: L = -1/N sum_t log p(x_{t+1} | x_<=t)  (cross entropy; exp(L) = perplexity)
    assistant_token_loss   SFT: the same, over the assistant's tokens only
    masked_cross_entropy   the same on given logits and a 0/1 mask (distillation's hard term)
    token_logprobs         log p(target_t | tokens before t) per position (DPO, GRPO)
    sequence_logprobs      log pi(answer | prompt): the sum (or mean) of an answer's token log-probs (DPO)
    distillation_kl        T^2 KL(softmax(teacher / T) || softmax(student / T)) (distillation)
    kl_k3                  Schulman's k3 estimate of KL(pi || pi_ref) per token (GRPO)
    bradley_terry_loss     L = -1/N sum log sigmoid(r_chosen - r_rejected) (reward models)

A stage's own objective (dpo.dpo_loss, grpo.grpo_loss, distill.distillation_loss, reward.RewardLoss)
combines these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acornlm.data.sft import IGNORE_INDEX


def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of next-token prediction: L = -1/N * sum_t log softmax(logits_t)[x_{t+1}].

    `batch` is (inputs, targets), targets being the inputs shifted left by one token; the
    logits are upcast to float32 so the softmax is accurate under bf16/fp16 autocast.
    """
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def assistant_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Masked next-token cross-entropy: L = -1/|A| * sum_{t in A} log softmax(logits_t)[x_{t+1}],
    A being the positions whose next token is an assistant token (targets != IGNORE_INDEX)."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | tokens before t) for every position: log_softmax(logits)[target], [B, T].

    Computed in float32 (log-probs of long answers are sums of many small numbers). Targets
    that are negative (padding) get log-prob 0; callers mask them out anyway.
    """
    logits = logits.float()
    safe_targets = targets.clamp(min=0)
    picked = torch.gather(logits, -1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """log pi(answer | prompt) = sum over answer tokens of log p(token), one number per row [B].

    `mask` is 1 on the answer tokens (the loss mask). With `average`, the sum is divided by the
    number of answer tokens (the length-normalised log-prob IPO uses).
    """
    mask = mask.to(torch.float32)
    total = (token_logprobs(logits, targets) * mask).sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-1/N sum log softmax(logits_t)[target_t] over the N masked tokens (the hard-label loss)."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
    mask = mask.to(torch.float32).flatten()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the masked tokens.

    KL(p || q) = sum_v p_v (log p_v - log q_v) per token; logits are [B, T, V], `mask` [B, T]
    is 1 where the token counts (the assistant tokens). Computed in float32.
    """
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    mask = mask.to(torch.float32)
    return temperature ** 2 * (per_token * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) by Schulman's k3 estimator (as in DeepSeekMath eq. 4):

        KL ~ exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1

    unbiased for samples drawn from pi, and never negative.
    """
    delta = reference_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """The pairwise loss of a reward model (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1):

        P(chosen beats rejected) = sigmoid(r_c - r_r),    L = -1/N sum log sigmoid(r_c - r_r - m)

    the negative log-likelihood of the observed preferences, so only the difference of two rewards
    is learned (adding a constant to every reward changes nothing). `margin` m [N] (optional, the
    margin loss of Llama 2, Touvron et al. 2023) demands a wider gap for pairs rated far apart.
    F.logsigmoid stays finite for any gap, where log(sigmoid(x)) underflows to -inf below x ~ -100.
    Rewards [N] are upcast to float32.
    """
    difference = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()
