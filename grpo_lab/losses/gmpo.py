"""GMPO: the geometric mean of a sequence's token ratios.

Zhao et al. 2025, "Geometric-Mean Policy Optimization" (arXiv:2507.20673), as verl's
``geo_mean`` policy loss computes it: GRPO's objective averages token ratios
arithmetically, so one outlier token ratio moves the whole update; GMPO takes their
geometric mean, clipped per token in log space,

    loss_i = -A_i * exp( mean_t sgn(A_i) * min(sgn(A_i) log r_t, sgn(A_i) clip(log r_t, -eps_low, eps_high)) ),

and averages over sequences (each row's advantage is its tokens' mean advantage).
Departures, stated: the rows are averaged over the optimizer step's rows (a
micro-batch's share of the mini-batch, so the gradient does not depend on the
micro-batch size), not over one forward's; ``algo.clip_low`` / ``algo.clip_high`` are
the log-space bounds (the paper's are 0.4 each: ``configs/algo/gmpo.yaml``);
``tis_weights`` multiply each token's log-ratio contribution's weight (their row mean
multiplies the row's loss); a token selection (``keep``: the top-entropy tokens, the rows
the off-policy mask keeps) picks the tokens whose ratios form the geometric mean, and a
row with none selected contributes 0.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .policy import Objective, register_policy_loss
from .terms import LossScale, masked_mean, token_advantages


def geometric_mean_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float,
                        clip_high: float, scale: LossScale, entropy: Tensor | None = None,
                        tis_weights: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO's loss (module docstring); shapes as :func:`~grpo_lab.losses.clipped_policy_loss`'s."""
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    mask = mask.to(logprobs.dtype)  # [B, T]
    adv = token_advantages(advantages, logprobs)  # [B, 1] or [B, T]
    adv = adv.expand_as(logprobs)  # [B, T]
    lengths = mask.sum(-1)  # [B]
    row_adv = (adv * mask).sum(-1) / (lengths + 1e-8)  # [B]
    log_ratio = logprobs - old_logprobs  # [B, T]
    sign = torch.sign(adv)  # [B, T]
    clipped = torch.clamp(log_ratio, -clip_low, clip_high)  # [B, T]
    kept = sign * torch.minimum(sign * log_ratio, sign * clipped)  # [B, T]
    selected = mask if keep is None else mask * keep.detach().to(mask.dtype)  # [B, T] the tokens of the mean
    chosen = selected.sum(-1)  # [B]
    ratio = torch.exp((kept * selected).sum(-1) / (chosen + 1e-8))  # [B]
    per_row = -row_adv * ratio * (chosen > 0).to(ratio.dtype)  # [B], a row with no selected token: 0
    if tis_weights is not None:
        per_row = per_row * ((tis_weights.detach() * mask).sum(-1) / (lengths + 1e-8))  # [B]
    loss = per_row.sum() / max(scale.num_seqs, 1.0)  # []
    with torch.no_grad():
        out_of_range = (log_ratio != clipped).to(mask.dtype)  # [B, T]
        metrics = {"clip_frac_high": masked_mean(out_of_range * (adv > 0), mask),
                   "clip_frac_low": masked_mean(out_of_range * (adv < 0), mask),
                   "approx_kl": masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask),
                   "ratio_mean": ratio.mean() if ratio.numel() else ratio.new_zeros(())}
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.to(mask.dtype), mask)
    return loss, metrics


@register_policy_loss("geo_mean", options=("clip_low", "clip_high"))
def geo_mean(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, objective: Objective, *,
             scale: LossScale, entropy: Tensor | None = None, tis_weights: Tensor | None = None,
             keep: Tensor | None = None, streams: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The geometric mean of each sequence's clipped token ratios times its advantage (GMPO)."""
    return geometric_mean_loss(logprobs, old_logprobs, advantages, mask, clip_low=objective.clip_low,
                               clip_high=objective.clip_high, scale=scale, entropy=entropy, tis_weights=tis_weights, keep=keep)
