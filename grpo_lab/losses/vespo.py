"""VESPO: a smooth, asymmetric Gamma-shaped weight on the sequence importance ratio.

"VESPO: Variational Sequence-Level Soft Policy Optimization for Stable Off-Policy LLM
Training" (arXiv:2602.10693), as TRL's ``loss_type="vespo"`` computes it. In place of a
hard clip, each row's log-prob gradient is scaled by a detached weight of its sequence
importance ratio ``w = prod_t r_t``,

    phi(w) = exp(lambda) * w^k * exp(-lambda * w),      loss_t = -sg(phi(w)) * A * log pi(o_t),

which is 1 at ``w = 1`` and falls smoothly both ways: the power ``k`` down-weights rows
whose ratio is small, the decay ``lambda`` those whose ratio is large. ``(k, lambda)``
are ``(k_pos, lambda_pos)`` on rows with ``A >= 0`` and ``(k_neg, lambda_neg)`` on the
others; TRL's defaults ``(2, 3)`` and ``(3, 2)`` (the paper's c1, c2 of its Section 3.4).
Numerics as TRL's: token log-ratios clamped to [-20, 20], their row *sum* (not mean)
clamped to [log 1e-8, 20]; a non-finite ``phi`` is 0.

Departure, stated: TRL folds the sampler's (vLLM's) per-token importance ratio into
``w`` rather than multiplying the loss by it; here the rollout-correction weights
(``algo.tis_cap``, and the behaviour weights of stale rows) are folded in the same way,
their logs summed into ``log w`` over the row's tokens (token-level weights only:
``algo.tis_level=token``, which the config checks). A token selection multiplies the
per-token loss after ``phi``, ``w`` staying the whole row's, as TRL applies its masks.
The aggregation is ``algo.loss_agg`` (TRL's is the token mean over the batch,
``token-mean``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .policy import Objective, register_policy_loss
from .terms import LossScale, aggregate, masked_mean, token_advantages, weigh_tokens

#: the clamps of the token and sequence log-ratios (TRL's)
TOKEN_LOG_RATIO_CLAMP = 20.0
SEQUENCE_LOG_RATIO_MIN = math.log(1e-8)
SEQUENCE_LOG_RATIO_MAX = 20.0


@torch.no_grad()
def gamma_weights(log_ratio: Tensor, row_advantages: Tensor, mask: Tensor, *, k_pos: float, lambda_pos: float,
                  k_neg: float, lambda_neg: float, tis_weights: Tensor | None = None) -> Tensor:
    """``phi(w)`` ``[B, 1]`` of each row (module docstring), detached.

    Args:
        log_ratio: ``[B, T]`` ``log pi - log pi_old`` per token.
        row_advantages: ``[B]`` each row's advantage (its sign picks ``k`` and ``lambda``).
        mask: ``[B, T]``.
        tis_weights: ``[B, T]`` sampler-correction weights folded into ``w``, or None.
    """
    clamped = torch.clamp(log_ratio, -TOKEN_LOG_RATIO_CLAMP, TOKEN_LOG_RATIO_CLAMP)  # [B, T]
    seq = (clamped * mask).sum(-1, keepdim=True)  # [B, 1]
    if tis_weights is not None:
        log_is = torch.clamp(torch.log(tis_weights.to(seq.dtype).clamp(min=1e-30)), SEQUENCE_LOG_RATIO_MIN,
                             SEQUENCE_LOG_RATIO_MAX)  # [B, T]
        seq = seq + (log_is * mask).sum(-1, keepdim=True)  # [B, 1]
    log_w = torch.clamp(seq, SEQUENCE_LOG_RATIO_MIN, SEQUENCE_LOG_RATIO_MAX)  # [B, 1]
    nonneg = row_advantages.reshape(-1, 1) >= 0  # [B, 1]
    k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)  # [B, 1]
    lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)  # [B, 1]
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))  # [B, 1]
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)  # [B, 1]


def vespo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, k_pos: float,
               lambda_pos: float, k_neg: float, lambda_neg: float, loss_agg, scale: LossScale,
               entropy: Tensor | None = None, tis_weights: Tensor | None = None,
               keep: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """VESPO's loss (module docstring); shapes as :func:`~grpo_lab.losses.clipped_policy_loss`'s.
    Token advantages ``[B, T]`` pick a row's ``(k, lambda)`` by their mean over its tokens."""
    mask = mask.to(logprobs.dtype)  # [B, T]
    adv = token_advantages(advantages, logprobs)  # [B, 1] or [B, T]
    row_adv = (adv.expand_as(logprobs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    log_ratio = (logprobs - old_logprobs).detach()  # [B, T]
    phi = gamma_weights(log_ratio, row_adv, mask, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                        lambda_neg=lambda_neg, tis_weights=tis_weights)  # [B, 1]
    per_token = weigh_tokens(-phi * adv * logprobs, None, keep)  # [B, T], the selection after phi (TRL's order)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)  # [B, T]
        rows = (mask.sum(-1) > 0).to(phi.dtype)  # [B]
        metrics = {"phi_seq_mean": (phi.flatten() * rows).sum() / rows.sum().clamp(min=1),
                   "approx_kl": masked_mean(ratio - 1 - log_ratio, mask), "ratio_mean": masked_mean(ratio, mask)}
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.to(mask.dtype), mask)
    return aggregate(per_token, mask, loss_agg, scale), metrics  # []


def _check_vespo(params: Mapping[str, Any]) -> None:
    for key in ("k_pos", "k_neg", "lambda_pos", "lambda_neg"):
        if not float(params[key]) >= 0:
            raise ValueError(f"algo.loss_params.{key}={params[key]!r} is invalid: expected a number >= 0")


@register_policy_loss("vespo", params={"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0},
                      check=_check_vespo)
def vespo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, objective: Objective, *,
          scale: LossScale, entropy: Tensor | None = None, tis_weights: Tensor | None = None,
          keep: Tensor | None = None, streams: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The log-prob weighted by a Gamma-shaped, detached function of the sequence ratio (VESPO)."""
    p = objective.loss_params
    return vespo_loss(logprobs, old_logprobs, advantages, mask, k_pos=float(p["k_pos"]),
                      lambda_pos=float(p["lambda_pos"]), k_neg=float(p["k_neg"]), lambda_neg=float(p["lambda_neg"]),
                      loss_agg=objective.aggregation, scale=scale, entropy=entropy, tis_weights=tis_weights, keep=keep)
