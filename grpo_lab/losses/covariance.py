"""Clip-Cov and KL-Cov: restrain the few tokens whose covariance drives entropy collapse.

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models" (arXiv:2505.22617), as verl's ``clip_cov`` and ``kl_cov`` policy losses compute
them. Under policy-gradient updates the policy's entropy falls by about the covariance
between a token's log-prob and its advantage; a tiny share of tokens (high-probability
tokens with high advantages) carries most of it. Per token, over the micro-batch's
trained tokens,

    cov_t = (A_t - mean(A)) * (log pi(o_t) - mean(log pi)).

- **Clip-Cov**: PPO's clipped loss (``algo.clip_low`` / ``clip_high``), except that a
  random ``clip_ratio`` share of the tokens (at least one) whose ``cov_t`` lies in
  ``(cov_lower, cov_upper)``, among those the clip has not already cut, loses its
  gradient (its loss term is zeroed). verl's defaults: ``clip_ratio = 2e-4``,
  ``cov_lower = 1``, ``cov_upper = 5``.
- **KL-Cov**: the unclipped surrogate ``-A r`` everywhere, plus ``kl_coef * |log r|`` on
  the ``kl_ratio`` share of the tokens (at least one) with the largest ``cov_t``. verl's
  defaults: ``kl_ratio = 2e-4``, ``kl_coef = 1`` (the paper uses 2e-3 for its 7B model).
  ``|log r|`` is 0, and so is its gradient, at ``r = 1``: on a batch's first pass KL-Cov
  is the policy gradient, the penalty acts from the second pass on.

Departures, stated: none from verl's computation. The selection is over one
micro-batch's tokens, as verl's (so it depends on the micro-batch size), and Clip-Cov's
random choice draws from torch's global generator (the run's seed).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .policy import Objective, register_policy_loss
from .terms import LossScale, aggregate, masked_mean, token_advantages, weigh_tokens


def token_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``cov_t = (A_t - mean A) (log pi_t - mean log pi)`` ``[B, T]`` (detached), the means
    over the tokens of ``mask``; ``advantages`` ``[B, T]``."""
    logp = logprobs.detach()  # [B, T]
    adv = advantages.detach()  # [B, T]
    return (adv - masked_mean(adv, mask)) * (logp - masked_mean(logp, mask))  # [B, T]


def clip_cov_selection(cov: Tensor, eligible: Tensor, total: int, share: float, lower: float, upper: float) -> Tensor:
    """``[B, T]`` bool: a random ``max(int(share * total), 1)`` (``total``: the trained
    tokens, as verl counts) of the eligible tokens with ``lower < cov < upper`` (all of
    them if fewer); none without a token."""
    chosen = torch.zeros_like(eligible, dtype=torch.bool)  # [B, T]
    if total == 0:
        return chosen
    candidates = torch.nonzero(eligible & (cov > lower) & (cov < upper))  # [K, 2]
    count = min(max(int(share * total), 1), candidates.shape[0])
    picked = candidates[torch.randperm(candidates.shape[0])[:count].to(candidates.device)]  # [count, 2]
    chosen[picked[:, 0], picked[:, 1]] = True
    return chosen


def top_covariance(cov: Tensor, mask: Tensor, share: float) -> Tensor:
    """``[B, T]`` bool: the ``max(int(share * n), 1)`` tokens of ``mask`` (``n`` of them)
    with the largest ``cov``; none without a token, or with ``share = 0`` (verl's)."""
    valid = mask.bool()  # [B, T]
    chosen = torch.zeros_like(valid)  # [B, T]
    n = int(valid.sum())
    if n == 0 or share == 0:
        return chosen
    flat = torch.nonzero(valid.reshape(-1)).flatten()  # [n] positions of the valid tokens
    top = torch.topk(cov.reshape(-1)[flat], max(int(n * share), 1)).indices  # [k]
    chosen.view(-1)[flat[top]] = True
    return chosen


def _metrics(ratio: Tensor, log_ratio: Tensor, mask: Tensor, chosen: Tensor, entropy: Tensor | None) -> dict[str, Tensor]:
    with torch.no_grad():
        out = {"cov_selected_frac": masked_mean(chosen.to(mask.dtype), mask),
               "approx_kl": masked_mean(ratio - 1 - log_ratio, mask), "ratio_mean": masked_mean(ratio, mask)}
        if entropy is not None:
            out["entropy"] = masked_mean(entropy.to(mask.dtype), mask)
    return out


def clip_cov_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float,
                  clip_high: float, clip_ratio: float, cov_lower: float, cov_upper: float, loss_agg,
                  scale: LossScale, entropy: Tensor | None = None,
                  tis_weights: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov's loss (module docstring); shapes as :func:`~grpo_lab.losses.clipped_policy_loss`'s."""
    mask = mask.to(logprobs.dtype)  # [B, T]
    log_ratio = logprobs - old_logprobs  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = token_advantages(advantages, logprobs).expand_as(ratio)  # [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    cut_by_clip = (clipped > unclipped) & mask.bool()  # [B, T]
    cov = token_covariance(logprobs, adv, mask)  # [B, T]
    chosen = clip_cov_selection(cov, mask.bool() & ~cut_by_clip, int(mask.sum()), clip_ratio, cov_lower,
                                cov_upper)  # [B, T]
    per_token = weigh_tokens(torch.maximum(unclipped, clipped) * (~chosen).to(ratio.dtype), tis_weights, keep)  # [B, T]
    metrics = _metrics(ratio, log_ratio, mask, chosen, entropy)
    metrics["clip_frac"] = masked_mean(cut_by_clip.to(mask.dtype), mask)
    return aggregate(per_token, mask, loss_agg, scale), metrics  # []


def kl_cov_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, kl_ratio: float,
                kl_coef: float, loss_agg, scale: LossScale, entropy: Tensor | None = None,
                tis_weights: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov's loss (module docstring); shapes as :func:`~grpo_lab.losses.clipped_policy_loss`'s."""
    mask = mask.to(logprobs.dtype)  # [B, T]
    log_ratio = logprobs - old_logprobs  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = token_advantages(advantages, logprobs).expand_as(ratio)  # [B, T]
    chosen = top_covariance(token_covariance(logprobs, adv, mask), mask, kl_ratio)  # [B, T]
    per_token = weigh_tokens(-adv * ratio + kl_coef * log_ratio.abs() * chosen.to(ratio.dtype), tis_weights, keep)  # [B, T]
    metrics = _metrics(ratio, log_ratio, mask, chosen, entropy)
    return aggregate(per_token, mask, loss_agg, scale), metrics  # []


def _share(params: Mapping[str, Any], key: str) -> None:
    if not 0 <= float(params[key]) <= 1:
        raise ValueError(f"algo.loss_params.{key}={params[key]!r} is invalid: expected a share of tokens in [0, 1]")


def _check_clip_cov(params: Mapping[str, Any]) -> None:
    _share(params, "clip_ratio")
    if not float(params["cov_lower"]) < float(params["cov_upper"]):
        raise ValueError(f"algo.loss_params.cov_lower={params['cov_lower']!r} must be below "
                         f"cov_upper={params['cov_upper']!r}")


def _check_kl_cov(params: Mapping[str, Any]) -> None:
    _share(params, "kl_ratio")
    if not float(params["kl_coef"]) >= 0:
        raise ValueError(f"algo.loss_params.kl_coef={params['kl_coef']!r} is invalid: expected a number >= 0")


@register_policy_loss("clip_cov", options=("clip_low", "clip_high"),
                      params={"clip_ratio": 2e-4, "cov_lower": 1.0, "cov_upper": 5.0}, check=_check_clip_cov)
def clip_cov(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, objective: Objective, *,
             scale: LossScale, entropy: Tensor | None = None, tis_weights: Tensor | None = None,
             keep: Tensor | None = None, streams: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clip, and no gradient for a few tokens of high log-prob/advantage covariance (Clip-Cov)."""
    p = objective.loss_params
    return clip_cov_loss(logprobs, old_logprobs, advantages, mask, clip_low=objective.clip_low,
                         clip_high=objective.clip_high, clip_ratio=float(p["clip_ratio"]),
                         cov_lower=float(p["cov_lower"]), cov_upper=float(p["cov_upper"]),
                         loss_agg=objective.aggregation, scale=scale, entropy=entropy, tis_weights=tis_weights, keep=keep)


@register_policy_loss("kl_cov", params={"kl_ratio": 2e-4, "kl_coef": 1.0}, check=_check_kl_cov)
def kl_cov(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, objective: Objective, *,
           scale: LossScale, entropy: Tensor | None = None, tis_weights: Tensor | None = None,
           keep: Tensor | None = None, streams: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The unclipped surrogate, with a |log-ratio| penalty on the tokens of highest covariance (KL-Cov)."""
    p = objective.loss_params
    return kl_cov_loss(logprobs, old_logprobs, advantages, mask, kl_ratio=float(p["kl_ratio"]),
                       kl_coef=float(p["kl_coef"]), loss_agg=objective.aggregation, scale=scale, entropy=entropy,
                       tis_weights=tis_weights, keep=keep)
