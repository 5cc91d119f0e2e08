"""OPO: the length-weighted optimal baseline.

Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline" (arXiv:2505.23585): under
exact on-policy training the variance-minimising baseline weighs each response by the
squared norm of its gradient, which the paper approximates by its length. Each episode's
advantage is its return minus its group's length-weighted mean return,

    A_i = R_i - sum_j l_j R_j / sum_j l_j,

``l_j`` being episode j's trained tokens (``AdvantageInputs.lengths`` summed over its
rows), as verl's ``compute_opo_outcome_advantage``. No std division.

Departure, stated: a group of one has no baseline and gets 0 (verl keeps its raw reward),
as every group-relative estimator here does.
"""

from __future__ import annotations

import torch

from .grouping import episode_groups
from .registry import AdvantageInputs, AdvantageOutput, register_estimator


@register_estimator("opo")
def opo(inputs: AdvantageInputs) -> AdvantageOutput:
    """Episode return minus its group's length-weighted mean return (OPO's optimal baseline).

    Args:
        inputs: rows with ``rewards``, ``traj_id``, ``group_id`` and ``lengths`` (``[N]``).

    Returns:
        ``[N]`` advantages, constant within an episode.
    """
    inputs.no_row_penalty("opo")
    if inputs.lengths is None:
        raise ValueError("opo weighs each episode by its length: AdvantageInputs.lengths (tokens per row) is needed")
    if inputs.rewards.numel() == 0:
        return AdvantageOutput.no_rows()
    eg = episode_groups(inputs)
    k = eg.group_size.numel()
    weighted = torch.zeros(k, dtype=torch.float64).index_add_(0, eg.traj_group, eg.tokens * eg.returns)  # [K]
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, eg.traj_group, eg.tokens)  # [K]
    baseline = weighted / total.clamp(min=1e-12)  # [K]
    adv = torch.where(eg.no_signal[eg.traj_group], torch.zeros_like(eg.returns),
                      eg.returns - baseline[eg.traj_group])[eg.row_traj]  # [N]
    return AdvantageOutput(adv.to(inputs.rewards.dtype), {"frac_zero_std_groups": eg.frac_no_signal()})
