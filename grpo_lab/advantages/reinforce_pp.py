"""REINFORCE++ and REINFORCE++-baseline: returns whitened over the whole batch.

Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
Models" (arXiv:2501.03262), as verl's ``compute_reinforce_plus_plus_outcome_advantage``
and ``compute_reinforce_plus_plus_baseline_outcome_advantage`` compute it:

- ``reinforce_pp``: each row's return ``G_t = r_t + gamma G_{t+1}`` over its episode,
  then whitened over the batch: ``(G - mean) / sqrt(var + 1e-8)``, the mean and the
  Bessel-corrected variance taken over the batch's trained tokens (each row weighs its
  token count, ``AdvantageInputs.lengths``), as verl's ``masked_whiten`` over the
  response mask. No group baseline: the batch is the baseline.
- ``reinforce_pp_baseline``: each episode's return minus its group's mean return (the
  group as GRPO's, each episode counted once), then whitened over the batch as above.

Departures, stated: the discount runs over an episode's turns, not its tokens (a
single-turn task, and verl's default ``gamma = 1``, are the same either way); a group of
one has no baseline and gets 0 before the whitening (verl keeps its raw reward), as every
group-relative estimator here does.
"""

from __future__ import annotations

import torch

from .grouping import discounted_returns, episode_groups, whiten
from .registry import AdvantageInputs, AdvantageOutput, register_estimator


@register_estimator("reinforce_pp")
def reinforce_pp(inputs: AdvantageInputs, *, gamma: float = 1.0, eps: float = 1e-8) -> AdvantageOutput:
    """Each row's discounted return, whitened over the batch's tokens (REINFORCE++).

    Args:
        inputs: rows with ``rewards``, ``traj_id``, ``step``, ``group_id`` and ``lengths``
            (``[N]``).
        gamma: the discount over an episode's turns.
        eps: inside the square root of the whitening.

    Returns:
        ``[N]`` advantages.
    """
    inputs.no_row_penalty("reinforce_pp")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if inputs.rewards.numel() == 0:
        return AdvantageOutput.no_rows()
    step = inputs.step if inputs.step is not None else torch.zeros_like(inputs.traj_id)
    returns = discounted_returns(inputs.rewards.to(torch.float64), inputs.traj_id, step, gamma)  # [N]
    adv = whiten(returns, inputs.row_lengths(), eps)  # [N]
    return AdvantageOutput(adv.to(inputs.rewards.dtype), {"frac_zero_std_groups": episode_groups(inputs).frac_no_signal()})


@register_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline(inputs: AdvantageInputs, *, eps: float = 1e-8) -> AdvantageOutput:
    """Episode return minus its group's mean, whitened over the batch's tokens (REINFORCE++-baseline).

    Args:
        inputs: rows with ``rewards``, ``traj_id``, ``group_id`` and ``lengths`` (``[N]``).
        eps: inside the square root of the whitening.

    Returns:
        ``[N]`` advantages, constant within an episode.
    """
    inputs.no_row_penalty("reinforce_pp_baseline")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if inputs.rewards.numel() == 0:
        return AdvantageOutput.no_rows()
    eg = episode_groups(inputs)
    centred = torch.where(eg.group_size[eg.traj_group] > 1, eg.returns - eg.mean[eg.traj_group],
                          torch.zeros_like(eg.returns))  # [T]
    adv = whiten(centred, eg.tokens, eps)[eg.row_traj]  # [N]
    return AdvantageOutput(adv.to(inputs.rewards.dtype), {"frac_zero_std_groups": eg.frac_no_signal()})
