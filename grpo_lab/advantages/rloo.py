"""RLOO: the leave-one-out baseline.

Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", as used for LLMs
by Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs": each episode's baseline is the mean return of the
*other* episodes of its group,

    A_i = R_i - (sum_j R_j - R_i) / (G - 1) = G / (G - 1) * (R_i - mean(R)).

There is no std division. A group of one has no baseline and gets 0; so does a group
whose returns are all equal.

With a row penalty (``AdvantageInputs.penalty``) a row's score is its episode's return
minus its own penalty, and the baseline is the mean over the other episodes of their
mean row score.
"""

from __future__ import annotations

import torch

from .grouping import episode_weights, trajectory_table, weighted_group_moments
from .registry import AdvantageInputs, AdvantageOutput, register_estimator


@register_estimator("rloo")
def rloo(inputs: AdvantageInputs) -> AdvantageOutput:
    """Episode return minus the mean return of the other episodes of its group (RLOO).

    Args:
        inputs: rows with ``rewards``, ``group_id`` and ``traj_id`` (``[N]``).

    Returns:
        ``[N]`` advantages, constant within an episode.
    """
    if inputs.rewards.numel() == 0:
        return AdvantageOutput.no_rows()
    rewards = inputs.rewards.to(torch.float64)
    returns, traj_group, row_traj = trajectory_table(rewards, inputs.traj_id, inputs.group_id)
    penalty = inputs.row_penalty()
    score = returns[row_traj] - penalty  # [N]
    weight, units, row_group = episode_weights(row_traj, traj_group)
    mean, _, constant = weighted_group_moments(score, weight, row_group, units)
    constant = constant | (units <= 1)
    # the episode's own mean score, and the mean of the others' (units * mean sums every episode's)
    own = torch.zeros_like(returns).index_add_(0, row_traj, weight * score)[row_traj]
    size = units[row_group]
    adv = score - (size * mean[row_group] - own) / (size - 1).clamp(min=1)
    adv = torch.where(constant[row_group], torch.zeros_like(adv), adv)
    return AdvantageOutput(adv.to(inputs.rewards.dtype), {"frac_zero_std_groups": float(constant.float().mean())})
