"""Pass@k advantages: only the group's best episode is pushed up.

Training for pass@k rather than pass@1 rewards a group for its best answer. In the
group-relative form verl ships as ``grpo_passk`` (its docstring cites arXiv:2503.19595),
the best episode of each group gets the margin by which it beats the second best, over
the group's std, and every other episode gets 0:

    A_best = (R_(1) - R_(2)) / (std(R) + eps),    A_other = 0.

Ties for the best give 0 (the margin is 0). ``norm_adv_by_std=False`` drops the std
division. Departure, stated: a group of one gets 0 (verl refuses it).
"""

from __future__ import annotations

import torch

from .grouping import episode_groups
from .registry import AdvantageInputs, AdvantageOutput, register_estimator


@register_estimator("grpo_passk")
def grpo_passk(inputs: AdvantageInputs, *, norm_adv_by_std: bool = True, eps: float = 1e-6) -> AdvantageOutput:
    """The group's best episode gets its margin over the second best (over the std); the others 0 (pass@k).

    Args:
        inputs: rows with ``rewards``, ``traj_id`` and ``group_id`` (``[N]``).
        norm_adv_by_std: divide the margin by the group's (Bessel-corrected) std plus ``eps``.
        eps: added to the std.

    Returns:
        ``[N]`` advantages, constant within an episode.
    """
    inputs.no_row_penalty("grpo_passk")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if inputs.rewards.numel() == 0:
        return AdvantageOutput.no_rows()
    eg = episode_groups(inputs)
    returns, traj_group, k = eg.returns, eg.traj_group, eg.group_size.numel()
    # the best episode of each group (the first of equal bests), then the best of the rest
    order = torch.argsort(-returns, stable=True)  # [T] by return, descending
    order = order[torch.argsort(traj_group[order], stable=True)]  # [T] grouped, each group best first
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = traj_group[order][1:] != traj_group[order][:-1]
    best = order[first]  # [K] episode index of each group's best
    top = torch.full((k,), -torch.inf, dtype=torch.float64).scatter_reduce(0, traj_group, returns, "amax")  # [K]
    rest = returns.clone()
    rest[best] = -torch.inf
    second = torch.full((k,), -torch.inf, dtype=torch.float64).scatter_reduce(0, traj_group, rest, "amax")  # [K]
    margin = torch.where(eg.group_size > 1, top - second, torch.zeros_like(top))  # [K]
    if norm_adv_by_std:
        margin = margin / (eg.std + eps)
    adv = torch.zeros_like(returns)  # [T]
    adv[best] = torch.where(eg.no_signal, torch.zeros_like(margin), margin)[traj_group[best]]
    return AdvantageOutput(adv[eg.row_traj].to(inputs.rewards.dtype), {"frac_zero_std_groups": eg.frac_no_signal()})
