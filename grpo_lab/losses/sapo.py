"""SAPO: a soft, temperature-controlled gate on the importance ratio instead of a clip.

Gao et al. 2025 (Qwen), "Soft Adaptive Policy Optimization" (arXiv:2511.20347), as TRL's
``loss_type="sapo"`` and verl's ``sapo`` policy loss compute it. PPO's clip cuts a
token's gradient off once its ratio leaves the range; SAPO replaces the ratio by a smooth
gate whose gradient fades as the ratio moves away from 1,

    f(r, tau) = sigmoid(tau * (r - 1)) * 4 / tau,      loss_t = -f(r_t, tau) * A_t,

with ``tau = tau_pos`` on tokens with a positive advantage and ``tau_neg`` on the others
(negative tokens are gated more sharply: their gradients spread over the whole
vocabulary and destabilise sooner). ``df/dr = 4 s (1 - s)`` with ``s = sigmoid(tau (r - 1))``
is exactly 1 at ``r = 1``: on its first pass over a batch SAPO's gradient is the policy
gradient. Defaults ``tau_pos = 1.0``, ``tau_neg = 1.05`` (TRL's and verl's). The log-ratio
is clamped to [-20, 20] before ``exp``, as verl does. Departures, stated: none in the
per-token loss; the aggregation is ``algo.loss_agg``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .policy import Objective, register_policy_loss
from .terms import LossScale, aggregate, masked_mean, token_advantages, weigh_tokens

#: the log-ratio is clamped to this magnitude before ``exp`` (verl's)
LOG_RATIO_CLAMP = 20.0


def sapo_gate(ratio: Tensor, tau: Tensor | float) -> Tensor:
    """``sigmoid(tau * (ratio - 1)) * 4 / tau`` (its slope at ``ratio = 1`` is 1)."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


def sapo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, tau_pos: float,
              tau_neg: float, loss_agg, scale: LossScale, entropy: Tensor | None = None,
              tis_weights: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO's loss (module docstring); shapes as :func:`~grpo_lab.losses.clipped_policy_loss`'s."""
    mask = mask.to(logprobs.dtype)  # [B, T]
    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = token_advantages(advantages, logprobs).expand_as(ratio)  # [B, T]
    tau = torch.where(adv > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))  # [B, T]
    per_token = weigh_tokens(-sapo_gate(ratio, tau) * adv, tis_weights, keep)  # [B, T]
    with torch.no_grad():
        s = torch.sigmoid(tau * (ratio - 1.0))  # [B, T]
        metrics = {"gate_slope_mean": masked_mean(4 * s * (1 - s), mask),  # the gradient's weight, 1 on-policy
                   "approx_kl": masked_mean(ratio - 1 - log_ratio, mask), "ratio_mean": masked_mean(ratio, mask)}
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.to(mask.dtype), mask)
    return aggregate(per_token, mask, loss_agg, scale), metrics  # []


def _check_sapo(params: Mapping[str, Any]) -> None:
    for key in ("tau_pos", "tau_neg"):
        if not float(params[key]) > 0:
            raise ValueError(f"algo.loss_params.{key}={params[key]!r} is invalid: expected a temperature > 0")


@register_policy_loss("sapo", params={"tau_pos": 1.0, "tau_neg": 1.05}, check=_check_sapo)
def sapo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, objective: Objective, *,
         scale: LossScale, entropy: Tensor | None = None, tis_weights: Tensor | None = None,
         keep: Tensor | None = None, streams: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """A sigmoid gate on the ratio, sharper for negative advantages, in place of the clip (SAPO)."""
    params = objective.loss_params
    return sapo_loss(logprobs, old_logprobs, advantages, mask, tau_pos=float(params["tau_pos"]),
                     tau_neg=float(params["tau_neg"]), loss_agg=objective.aggregation, scale=scale, entropy=entropy,
                     tis_weights=tis_weights, keep=keep)
