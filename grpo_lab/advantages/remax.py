"""ReMax: the greedy answer's return as each task's baseline.

Li et al. 2024, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method
for Aligning Large Language Models" (ICML 2024), as verl's
``compute_remax_outcome_advantage``: for each task the sampler also plays one greedy
episode (``rollout.sampler=remax``; ``AdvantageInputs.baseline_only`` marks its rows), and
every sampled episode's rows get

    A = R(episode) - R(greedy episode of the same task),

with no normalisation. The greedy episode only scores (advantage 0; its rows leave the
batch before the update). The baseline costs one extra episode per task and is
independent of the sampled ones, so the estimate is unbiased.

Departures, stated: ``R`` is the episode's undiscounted return (verl's reward-to-go over
tokens equals it for an outcome reward); with several samples per task each is compared
with the same greedy return (verl's ``n > 1``); a group whose greedy episode was lost (an
environment fault) has no baseline and gets 0, counted in ``remax_groups_without_baseline``.
"""

from __future__ import annotations

import torch

from .grouping import trajectory_table
from .registry import AdvantageInputs, AdvantageOutput, register_estimator


@register_estimator("remax")
def remax(inputs: AdvantageInputs) -> AdvantageOutput:
    """Episode return minus its task's greedy episode's return (ReMax).

    Args:
        inputs: rows with ``rewards``, ``traj_id``, ``group_id`` and ``baseline_only``
            (``[N]``; the greedy episodes' rows).

    Returns:
        ``[N]`` advantages, constant within an episode, 0 on the greedy episodes' rows.
    """
    inputs.no_row_penalty("remax")
    if inputs.rewards.numel() == 0:
        return AdvantageOutput.no_rows()
    baseline_rows = (inputs.baseline_only if inputs.baseline_only is not None
                     else torch.zeros_like(inputs.traj_id, dtype=torch.bool))  # [N]
    returns, traj_group, row_traj = trajectory_table(inputs.rewards.to(torch.float64), inputs.traj_id, inputs.group_id)
    k = int(traj_group.max()) + 1
    greedy = torch.zeros_like(returns, dtype=torch.bool).index_fill_(0, row_traj[baseline_rows], True)  # [T]
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, traj_group, greedy.double())  # [K]
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, traj_group, returns * greedy)  # [K]
    has_baseline = count > 0  # [K]
    baseline = total / count.clamp(min=1)  # [K] the greedy return (their mean, were there several)
    adv = torch.where(has_baseline[traj_group] & ~greedy, returns - baseline[traj_group],
                      torch.zeros_like(returns))  # [T]
    sampled = ~greedy  # [T]
    moved = torch.zeros(k, dtype=torch.float64).index_add_(0, traj_group, (adv != 0).double())  # [K]
    metrics = {"frac_zero_std_groups": float((moved == 0).double().mean()),
               "remax_groups_without_baseline": float((~has_baseline).sum()),
               "remax_baseline_return": float(baseline[has_baseline].mean()) if bool(has_baseline.any()) else 0.0,
               "remax_sampled_return": float(returns[sampled].mean()) if bool(sampled.any()) else 0.0}
    return AdvantageOutput(adv[row_traj].to(inputs.rewards.dtype), metrics)
