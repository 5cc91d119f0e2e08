"""GRPO: group-relative outcome advantages.

Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
Language Models" (Group Relative Policy Optimization): each response's advantage is its
reward minus the mean reward of its group, divided by the group's standard deviation.

For multi-turn agents the "response" is an episode: the episode's return (the sum of its
step rewards) is normalised among the G episodes of its group, and every step row of the
episode receives that value. Departures and choices:

- The statistics are taken over episodes, never over step rows, so a long episode does
  not weigh more than a short one.
- The std is Bessel-corrected (``torch.std``'s default, as in TRL and verl).
- ``scale_rewards="none"`` drops the std division (Liu et al. 2025, "Understanding
  R1-Zero-Like Training: A Critical Perspective", Dr. GRPO); ``"batch"`` divides by the
  std of all episode returns in the batch instead of the group's.
- A group whose returns are all equal gets exactly zero advantage (it carries no
  learning signal), and is counted in ``frac_zero_std_groups``.
- With a row penalty (``AdvantageInputs.penalty``, ``algo.penalty_placement=row``) a
  row's score is its episode's return minus its own penalty, so rows of one episode may
  differ; the statistics still weigh each episode once (each row ``1 / episode length``;
  the std corrects for the number of episodes), and "all equal" means all row scores.
  Without a penalty this is exactly the per-episode computation above.
"""

from __future__ import annotations

import torch

from .grouping import episode_weights, normalize_weighted, trajectory_table, weighted_group_moments
from .registry import AdvantageInputs, AdvantageOutput, register_estimator

SCALE_MODES = ("group", "batch", "none")


@register_estimator("grpo")
def grpo(inputs: AdvantageInputs, *, scale_rewards: str = "group", eps: float = 1e-6) -> AdvantageOutput:
    """Episode return minus its group's mean, over the group's std (GRPO; Dr. GRPO with scale_rewards='none').

    Args:
        inputs: rows with ``rewards`` ``[N]``, ``group_id`` ``[N]``, ``traj_id`` ``[N]``.
        scale_rewards: ``"group"`` (std of the group), ``"batch"`` (std of all episode
            returns) or ``"none"`` (mean-centering only).
        eps: added to the std before dividing.

    Returns:
        ``[N]`` advantages, one per row, constant within an episode.
    """
    if scale_rewards not in SCALE_MODES:
        raise ValueError(f"scale_rewards must be one of {SCALE_MODES}, got {scale_rewards!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if inputs.rewards.numel() == 0:
        return AdvantageOutput.no_rows()
    rewards = inputs.rewards.to(torch.float64)
    returns, traj_group, row_traj = trajectory_table(rewards, inputs.traj_id, inputs.group_id)
    score = returns[row_traj] - inputs.row_penalty()  # [N] each row's episode score
    weight, units, row_group = episode_weights(row_traj, traj_group)
    if scale_rewards == "batch":  # the group's mean, the batch's std
        mean, _, constant = weighted_group_moments(score, weight, row_group, units)
        constant = constant | (units <= 1)
        _, batch_std, _ = weighted_group_moments(score, weight, torch.zeros_like(row_group), units.sum().reshape(1))
        adv = (score - mean[row_group]) / (batch_std[0] + eps)
        adv = torch.where(constant[row_group], torch.zeros_like(adv), adv)
    else:  # a std that underflows to 0 is no signal, not 0 / 0
        adv, constant = normalize_weighted(score, weight, row_group, units,
                                           "mean_std_norm" if scale_rewards == "group" else "mean_norm", eps)
    metrics = {"frac_zero_std_groups": float(constant.float().mean())}
    return AdvantageOutput(adv.to(inputs.rewards.dtype), metrics)
