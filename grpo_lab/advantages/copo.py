"""COPO: a global, consistency-aware advantage for groups without local signal.

"COPO: Consistency-Aware Policy Optimization" (arXiv 2508.04138, 2025). When every
response of a group gets the same reward, GRPO's group-relative advantage is zero and
the prompt teaches nothing. COPO adds a *global* advantage that compares prompts with
each other, and blends the two per group by how consistent the group's outcomes are.

Per group of ``n`` episodes, with ``H`` the base-2 entropy of the empirical distribution
of its outcomes:

    R_global  = mean(R) * (1 - lambda * H),   lambda = (1 - 1/n) / log2(n)
    A_global  = (R_global - mean over groups) / (std over groups + eps)
    w_local   = sigmoid(k * (H - b))
    loss      = w_local * L(A_local) + (1 - w_local) * L(A_global)

``A_local`` is GRPO's (group mean and std). The blend acts on the two clipped policy
losses, per token, not on the advantages (the clipped loss is not linear in A); the
estimator returns ``A_local`` as ``advantages`` and the other two as ``extras``
(``global_advantages``, ``local_weight``), which :func:`clipped_policy_loss` reads.

Choices stated:

- An episode's outcome is its return (for binary success: won or not). The paper
  groups *extracted answers*; agent episodes have no single answer.
- ``blend="soft_forced"`` (default) zeroes ``w_local`` where ``A_local`` is zero, so a
  group with one outcome learns from the global stream only (the paper's "soft with
  forced" mode); ``"soft"`` keeps the sigmoid weight everywhere.
- The std is Bessel-corrected; groups of one episode have ``lambda = 0``.
- With a row penalty (``AdvantageInputs.penalty``, ``algo.penalty_placement=row``) the
  local stream is GRPO's with it, and the global stream takes each episode's score as
  its return minus the mean penalty of its rows, so that invalid actions cost in both
  streams (under ``episode`` placement the penalty is in the returns already).
"""

from __future__ import annotations

import torch

from .grouping import dense_ids, episode_weights, group_moments, pair_ids, trajectory_table
from .grpo import grpo
from .registry import AdvantageInputs, AdvantageOutput, register_estimator

BLENDS = ("soft_forced", "soft")


@register_estimator("copo")
def copo(
    inputs: AdvantageInputs,
    *,
    b: float = 0.5,
    k: float = 1.0,
    entropy_coef: bool = True,
    blend: str = "soft_forced",
    eps: float = 1e-6,
) -> AdvantageOutput:
    """GRPO's local advantage plus a batch-level consistency-weighted global stream (COPO, 2025).

    Args:
        inputs: rows with ``rewards``, ``group_id`` and ``traj_id`` (``[N]``).
        b, k: the blending sigmoid's offset and slope.
        entropy_coef: multiply the group's mean return by ``1 - lambda * H``.
        blend: ``"soft_forced"`` or ``"soft"``.

    Returns:
        ``advantages`` ``[N]`` (local), ``extras["global_advantages"]`` ``[N]`` and
        ``extras["local_weight"]`` ``[N]``, metrics ``frac_zero_std_groups``,
        ``copo_entropy_mean`` and ``copo_local_weight_mean``.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    local = grpo(inputs, scale_rewards="group", eps=eps)
    n = inputs.rewards.numel()
    if n == 0:
        return AdvantageOutput(local.advantages, local.metrics, {"global_advantages": torch.zeros(0), "local_weight": torch.zeros(0)})
    rewards = inputs.rewards.to(torch.float64)
    returns, traj_group, row_traj = trajectory_table(rewards, inputs.traj_id, inputs.group_id)
    weight, _, _ = episode_weights(row_traj, traj_group)
    returns = returns - torch.zeros_like(returns).index_add_(0, row_traj, weight * inputs.row_penalty())
    mean, _, size, _ = group_moments(returns, traj_group)
    # entropy of each group's outcome distribution (outcome = the episode's return)
    outcome, _ = dense_ids(returns)
    cell, _ = pair_ids(traj_group, outcome)
    cell_count = torch.zeros(int(cell.max()) + 1, dtype=torch.float64).index_add_(0, cell, torch.ones_like(returns))
    cell_group = torch.zeros_like(cell_count, dtype=torch.long).scatter_(0, cell, traj_group)
    p = cell_count / size[cell_group]
    entropy = torch.zeros_like(size).index_add_(0, cell_group, -p * torch.log2(p))
    log_n = torch.log2(size.clamp(min=1))
    lam = torch.where(size > 1, (1 - 1 / size) / torch.where(size > 1, log_n, torch.ones_like(log_n)), torch.zeros_like(size))
    global_reward = mean * (1 - lam * entropy) if entropy_coef else mean
    if global_reward.numel() > 1 and not bool((global_reward == global_reward[0]).all()):
        global_adv = (global_reward - global_reward.mean()) / (global_reward.std() + eps)
    else:
        global_adv = torch.zeros_like(global_reward)
    weight = torch.sigmoid(k * (entropy - b))
    row_group = traj_group[row_traj]
    local_weight = weight[row_group]
    if blend == "soft_forced":
        local_weight = torch.where(local.advantages != 0, local_weight, torch.zeros_like(local_weight))
    metrics = dict(local.metrics)
    metrics["copo_entropy_mean"] = float(entropy.mean())
    metrics["copo_local_weight_mean"] = float(local_weight.mean())
    extras = {
        "global_advantages": global_adv[row_group].to(inputs.rewards.dtype),
        "local_weight": local_weight.to(inputs.rewards.dtype),
    }
    return AdvantageOutput(local.advantages, metrics, extras)
