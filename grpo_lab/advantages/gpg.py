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

from .grouping import episode_groups
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
        return AdvantageOutput.no_rows()
    eg = episode_groups(inputs)
    alpha = eg.returns.numel() / max(int((eg.returns != 0).sum()), 1)
    adv = torch.where(eg.no_signal[eg.traj_group], torch.zeros_like(eg.returns),
                      alpha * (eg.returns - eg.mean[eg.traj_group]) / f_norm)  # [T]
    return AdvantageOutput(adv[eg.row_traj].to(inputs.rewards.dtype),
                           {"frac_zero_std_groups": eg.frac_no_signal(), "gpg_alpha": float(alpha)})
