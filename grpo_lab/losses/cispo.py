"""CISPO: a clipped, detached importance weight on the log-prob.

MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
Attention" (Clipped IS-weight Policy Optimization). PPO's clip drops the gradient of the
tokens whose ratio leaves the range (often the rare, decisive ones); CISPO keeps every
token's gradient and clips its importance weight instead:

    loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A * log pi(o_t),   r_t = pi / pi_old.

Its gradient is ``clip(r) * A * grad log pi``: the importance-sampled policy gradient
with a bounded weight, right on every pass over a batch (``r`` is against the policy
that sampled the batch, as PPO's). Departures, stated: the clip range is
``algo.clip_low`` / ``algo.clip_high`` (the paper leaves the lower bound off; set
``algo.clip_low=1.0``, which ``configs/algo/cispo.yaml`` does, with the paper's upper
bound left to tune); the aggregation is ``algo.loss_agg`` (the paper's is ``token-mean``).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .policy import Objective, register_policy_loss
from .terms import LossScale, aggregate, masked_mean, token_advantages, weigh_tokens


def cispo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float,
               clip_high: float, loss_agg, scale: LossScale, entropy: Tensor | None = None,
               tis_weights: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO's loss (module docstring); shapes as :func:`~grpo_lab.losses.clipped_policy_loss`'s."""
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    mask = mask.to(logprobs.dtype)  # [B, T]
    log_ratio = (logprobs - old_logprobs).detach()  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T], detached
    adv = token_advantages(advantages, logprobs)  # [B, 1] or [B, T]
    per_token = weigh_tokens(-weight * adv * logprobs, tis_weights, keep)  # [B, T]
    with torch.no_grad():
        metrics = {"clip_frac": masked_mean((weight != ratio).to(mask.dtype), mask),
                   "approx_kl": masked_mean(ratio - 1 - log_ratio, mask), "ratio_mean": masked_mean(ratio, mask)}
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.to(mask.dtype), mask)
    return aggregate(per_token, mask, loss_agg, scale), metrics  # []


@register_policy_loss("cispo", options=("clip_low", "clip_high"))
def cispo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, objective: Objective, *,
          scale: LossScale, entropy: Tensor | None = None, tis_weights: Tensor | None = None,
          keep: Tensor | None = None, streams: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The log-prob weighted by the clipped, detached importance ratio (CISPO, MiniMax-M1)."""
    return cispo_loss(logprobs, old_logprobs, advantages, mask, clip_low=objective.clip_low,
                      clip_high=objective.clip_high, loss_agg=objective.aggregation, scale=scale, entropy=entropy,
                      tis_weights=tis_weights, keep=keep)
