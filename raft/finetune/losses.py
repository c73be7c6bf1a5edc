"""The objectives' losses, as pure functions of tensors (what a model computes goes in; a loss comes out).

RAFT's own objective is the plain supervised loss (raft/modalities/text/sft.py for tokens, the denoising loss in
raft/modalities/diffusion/finetune.py for images); here are the baselines' that run in the same loop:

- RRHF (Yuan et al. 2023): a ranking loss over each prompt's scored candidates plus the NLL of the best;
- PPO (Ziegler et al. 2019, Ouyang et al. 2022; details of Huang et al. 2024 and TRL): the per-token KL penalty,
  GAE, the clipped policy and value losses.

Means over tokens take an optional `tokens` denominator: under N processes each process holds part of a
mini-batch, and the mean must be over the whole mini-batch's tokens (the trainer sums the processes' parts).
"""

from __future__ import annotations

import torch


# ---- RRHF


def rrhf_loss(logprob_sums: torch.Tensor, lengths: torch.Tensor, rewards: torch.Tensor, rrhf_weight: float,
              length_penalty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ranking loss, NLL of the best) for the candidates of one prompt.

        p_i    = sum_t log pi(y_i,t | x, y_i,<t) / |y_i| ** length_penalty      (response tokens only)
        L_rank = sum over pairs with r_i < r_j of max(0, p_i - p_j)
        L      = rrhf_weight * L_rank + NLL of the best candidate (mean over its tokens)

    `logprob_sums[i]` is candidate i's summed response log-probability, `lengths[i]` its response tokens.
    Ties in reward form no pair; the best is the first candidate with the highest reward."""
    scores = logprob_sums / lengths.to(logprob_sums.dtype) ** length_penalty
    worse = rewards[:, None] < rewards[None, :]  # worse[i, j]: candidate i has the lower reward
    rank = (scores[:, None] - scores[None, :]).clamp(min=0)[worse].sum()
    best = int(torch.argmax(rewards))  # argmax returns the first maximum
    nll = -logprob_sums[best] / lengths[best]
    return rrhf_weight * rank + nll, rank, nll


# ---- PPO


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL estimate): the KL penalty on every response token, the score on the last."""
    kl = (logprobs - ref_logprobs) * mask  # k1 estimator; its sum over a sampled response estimates the KL
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores * mask.any(1)  # a response with no tokens left has nowhere to put its score
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation; the response ends where the mask does."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        going_on = mask[:, t + 1].float() if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] * going_on if t + 1 < length else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * going_on * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    """Mean of `x` over the masked positions (over `tokens` of them, when they are spread over processes)."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if tokens is None else max(tokens, 1.0))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    average = masked_mean(x, mask)
    whitened = (x - average) * torch.rsqrt(masked_mean((x - average) ** 2, mask) + 1e-8)
    return (whitened if shift_mean else whitened + average) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, tokens: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the share of tokens where the clip was binding."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return (masked_mean(torch.maximum(unclipped, clipped), mask, tokens),
            masked_mean((clipped > unclipped).float(), mask, tokens))


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, tokens: float | None = None) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask, tokens)
