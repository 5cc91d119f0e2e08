"""GPG: group policy gradient with the batch's correction factor.

Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for Model
Reasoning" (arXiv:2504.02546): plain policy gradient (no ratio, no clip, no KL; with
``algo.policy_loss=reinforce``) on the group-centred return, scaled up by the share of
the batch that carries a signal:

    A_i = alpha (R_i - mean_group(R)) / F_norm,    alpha = B / M,

``B`` the episodes of the batch, ``M`` those with a non-zero return (at least 1), as
verl's ``compute_gpg_outcome_advantage`` computes it. Our reading, stated: the paper
motivates ``alpha`` as undoing the dilution of the gradient by samples that carry none;
verl counts the non-zero rewards, and this follows verl, the code users compare against.

Departure, stated: a group of one has no baseline and gets 0 (verl keeps its raw reward).
"""

from __future__ import annotations

import torch

from .grouping import episode_table, weighted_group_moments
from .registry import AdvantageInputs, AdvantageOutput, register_estimator


@register_estimator("gpg")
def gpg(inputs: AdvantageInputs, *, f_norm: float = 1.0) -> AdvantageOutput:
    """Group-centred return times the batch's episodes over those with a non-zero return (GPG).

    Args:
        inputs: rows with ``rewards``, ``traj_id`` and ``group_id`` (``[N]``).
        f_norm: the constant the advantage is divided by (> 0).

    Returns:
        ``[N]`` advantages, constant within an episode; metrics ``gpg_alpha``.
    """
    inputs.no_row_penalty("gpg")
    if not f_norm > 0:
        raise ValueError(f"f_norm must be > 0, got {f_norm}")
    if inputs.rewards.numel() == 0:
        return AdvantageOutput(torch.zeros(0), {"frac_zero_std_groups": 0.0})
    returns, traj_group, row_traj, _, group_size = episode_table(inputs)
    alpha = returns.numel() / max(int((returns != 0).sum()), 1)
    mean, _, constant = weighted_group_moments(returns, torch.ones_like(returns), traj_group, group_size)
    none = constant | (group_size <= 1)  # [K]
    adv = torch.where(none[traj_group], torch.zeros_like(returns), alpha * (returns - mean[traj_group]) / f_norm)
    return AdvantageOutput(adv[row_traj].to(inputs.rewards.dtype),
                           {"frac_zero_std_groups": float(none.float().mean()), "gpg_alpha": float(alpha)})
