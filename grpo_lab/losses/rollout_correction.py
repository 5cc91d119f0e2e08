"""Rollout correction: the trainer's and the engine's probabilities of the same sampled
tokens differ (other kernels, precision, batching, a stale engine), and these corrections
act on their per-token ratio ``rho_t = pi_old / pi_rollout``.

Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
Training-Inference Mismatch", as verl's rollout correction defines its levels:

- **Importance weights** (``algo.tis_cap`` with ``algo.tis_level``): ``token``: each
  token's ``min(rho_t, C)`` (Yao et al. 2025's truncated IS, the default); ``sequence``:
  ``min(prod_t rho_t, C)`` for every token of the row; ``geometric``:
  ``min((prod_t rho_t)^(1/|T|), C)``.
- **Rejection** (``algo.rejection`` with the band ``[algo.rejection_lower,
  algo.rejection_upper]``, the lower bound ``1 / upper`` by default): the tokens
  (``token``), or whole rows (``sequence``: the product of the ratios; ``geometric``:
  their geometric mean, which wants a band as tight as ``[0.999, 1.001]``) whose ratio
  leaves the band are left out of the loss.
- **Off-policy sequence masking** (``algo.off_policy_mask_threshold`` = delta):
  DeepSeek-AI 2025, "DeepSeek-V3.2" (its Equation 9), as TRL's
  ``off_policy_mask_threshold``: a row with a negative advantage whose mean per-token
  ``log pi_rollout - log pi`` (the sampler's against the policy being trained) exceeds
  delta leaves the policy loss (:func:`off_policy_sequence_keep`); rows with ``A >= 0``
  always stay. The KL term still sees it, as in TRL.

Each level is a function of the per-token log-ratio and the mask, one registry
(:data:`RATIO_LEVELS_OF_ROWS`), resolved once into the run's
:class:`~grpo_lab.losses.Objective`; the weights are
:func:`~grpo_lab.losses.truncated_is_weights` at that level, the rejection
:func:`rejection_keep`.
Departure, stated: a rejected token still counts in the loss's normaliser (the
mini-batch's token count is fixed before its forwards); its contribution is zero.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

from ..registry import Registry
from .terms import masked_mean

LogRatioLevel = Callable[[Tensor, Tensor], Tensor]

#: ``fn(log_rho [B, T], mask [B, T]) -> [B, T]``: each token's log-ratio at a level, by
#: ``algo.tis_level`` and ``algo.rejection``
RATIO_LEVELS_OF_ROWS: Registry[LogRatioLevel] = Registry("ratio_levels", "algo.tis_level / algo.rejection",
                                                        "ratio level", options=lambda fn: ())


@RATIO_LEVELS_OF_ROWS.register("token")
def token_level(log_rho: Tensor, mask: Tensor) -> Tensor:
    """Each token's own ratio."""
    return log_rho  # [B, T]


@RATIO_LEVELS_OF_ROWS.register("sequence")
def sequence_level(log_rho: Tensor, mask: Tensor) -> Tensor:
    """The product of the row's ratios, for every token of the row."""
    return (log_rho * mask).sum(-1, keepdim=True).expand_as(log_rho)  # [B, T]


@RATIO_LEVELS_OF_ROWS.register("geometric")
def geometric_level(log_rho: Tensor, mask: Tensor) -> Tensor:
    """The geometric mean of the row's ratios, for every token of the row."""
    mean = (log_rho * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    return mean.expand_as(log_rho)  # [B, T]


def rejection_keep(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, level: LogRatioLevel, lower: float,
                   upper: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The 0/1 tokens ``[B, T]`` whose ratio ``pi_old / pi_rollout`` at ``level`` lies in
    ``[lower, upper]``, and ``rejected_frac`` (the share of ``mask``'s tokens left out)."""
    if not 0 < lower <= 1 <= upper:
        raise ValueError(f"the rejection band must hold 1: lower={lower}, upper={upper}")
    mask = mask.to(old_logprobs.dtype)  # [B, T]
    log_rho = (old_logprobs - rollout_logprobs).detach() * mask  # [B, T], 0 off the mask
    value = level(log_rho, mask)  # [B, T]
    keep = ((value >= math.log(lower)) & (value <= math.log(upper))).to(mask.dtype)  # [B, T]
    return keep, {"rejected_frac": masked_mean(1.0 - keep, mask)}


def off_policy_sequence_keep(advantages: Tensor, logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                             threshold: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``[B, 1]`` 1 for the rows kept by DeepSeek-V3.2's off-policy sequence mask: ``A >= 0``
    or ``mean_t(log pi_rollout - log pi) <= threshold`` (module docstring); and
    ``off_policy_masked_frac``, the share of rows (with tokens) left out.

    Args:
        advantages: ``[B]``, or ``[B, T]`` (a row's sign is that of its tokens' mean).
        logprobs: ``[B, T]`` the policy's (detached here); rollout_logprobs: ``[B, T]``.
    """
    mask = mask.to(logprobs.dtype)  # [B, T]
    lengths = mask.sum(-1, keepdim=True)  # [B, 1]
    divergence = ((rollout_logprobs - logprobs.detach()) * mask).sum(-1, keepdim=True) / lengths.clamp(min=1)  # [B, 1]
    adv = advantages.reshape(-1, 1) if advantages.dim() == 1 else (
        (advantages * mask).sum(-1, keepdim=True) / lengths.clamp(min=1))  # [B, 1]
    keep = ((adv >= 0) | (divergence <= threshold)).to(mask.dtype)  # [B, 1]
    rows = (lengths > 0).to(mask.dtype)  # [B, 1]
    return keep, {"off_policy_masked_frac": ((1.0 - keep) * rows).sum() / rows.sum().clamp(min=1)}
