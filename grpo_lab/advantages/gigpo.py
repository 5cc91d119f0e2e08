"""GiGPO: episode-level plus step-level group-relative advantages.

Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training".

- Episode level: each episode's return (the sum of its step rewards) is normalised among
  the episodes of its group, as in GRPO.
- Step level: within one episode group, steps that acted from the same *anchor state*
  form a step group. Each step's discounted return ``G_t = r_t + gamma * G_{t+1}`` is
  normalised inside its step group; a step group of one gets 0.
- Final advantage of a step: ``episode + step_weight * step``.

Departures and choices, each stated:

- ``episode_stats="trajectory"`` (default) takes the episode statistics over episodes.
  The reference implementation computes them over step rows, which weighs an episode by
  its number of steps; ``episode_stats="step"`` reproduces that.
- The std is Bessel-corrected (as ``torch.std``), and a group whose values are all equal
  gets exactly 0. That includes an episode group of one, where the reference
  implementation returns the raw return (it uses mean 0 and std 1 for singletons).
- Anchors are compared exactly: text and numbers as they are, arrays and tensors by
  dtype, shape and bytes, dicts by their items (``grpo_lab.data.hashable_anchor``).
  ``similarity_threshold < 1`` additionally merges, inside an episode group, anchors
  whose text (``str(anchor)``) has a ``difflib`` similarity ratio at or above the
  threshold. The reference clusters greedily (a state joins the
  first cluster whose first member is similar enough), which depends on row order; here
  merging is transitive (single linkage), which does not. That pass loops over the
  distinct anchors of each group, not over rows.
- The invalid-action penalty (``grpo_lab.advantages.shaping``): with
  ``algo.penalty_placement=row`` (default) each row's own penalty
  (``AdvantageInputs.penalty``) is subtracted from that row's episode score and from its
  discounted step return, after discounting, as the reference does; with ``episode`` it
  was subtracted from the step rewards before this estimator, so it also enters the
  episode's return and the discounted returns of earlier steps. Under
  ``episode_stats="trajectory"`` the row scores of one episode may then differ; the
  statistics weigh each episode once (each row ``1 / episode length``, the std corrected
  for the number of episodes).
"""

from __future__ import annotations

import difflib
from typing import Hashable, Sequence

import torch
from torch import Tensor

from .grouping import (
    discounted_returns,
    episode_weights,
    group_moments,
    normalize_in_groups,
    normalize_weighted,
    pair_ids,
    trajectory_table,
)
from .registry import AdvantageInputs, AdvantageOutput, register_estimator

EPISODE_STATS = ("trajectory", "step")


def merge_similar_anchors(anchor_id: Tensor, group: Tensor, anchors: Sequence[Hashable], threshold: float) -> Tensor:
    """``[N]`` anchor ids where, inside each group, anchors whose ``str`` forms are at least
    ``threshold`` similar (``difflib.SequenceMatcher.ratio``) share one id."""
    if threshold >= 1.0:
        return anchor_id
    key, _ = pair_ids(group, anchor_id)
    # one representative row per (group, anchor)
    first_row = torch.full((int(key.max()) + 1,), len(anchors), dtype=torch.long).scatter_reduce(
        0, key, torch.arange(len(anchors)), "amin"
    )
    parent = list(range(first_row.numel()))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_group: dict[int, list[int]] = {}
    for k, row in enumerate(first_row.tolist()):
        by_group.setdefault(int(group[row]), []).append(k)
    for keys in by_group.values():
        texts = [str(anchors[int(first_row[k])]) for k in keys]
        for i in range(len(keys)):
            for j in range(i):
                if find(keys[i]) != find(keys[j]) and difflib.SequenceMatcher(None, texts[i], texts[j]).ratio() >= threshold:
                    parent[find(keys[i])] = find(keys[j])
    roots = torch.tensor([find(k) for k in range(len(parent))], dtype=torch.long)
    return roots[key]


@register_estimator("gigpo")
def gigpo(
    inputs: AdvantageInputs,
    *,
    gamma: float = 0.95,
    step_weight: float = 1.0,
    mode: str = "mean_norm",
    episode_stats: str = "trajectory",
    similarity_threshold: float = 1.0,
    eps: float = 1e-6,
) -> AdvantageOutput:
    """Episode-group plus anchor-state step-group advantages (GiGPO, Feng et al. 2025).

    Args:
        inputs: rows with ``rewards``, ``group_id``, ``traj_id``, ``step`` and
            ``anchor_id`` (all ``[N]``); ``anchors`` only when ``similarity_threshold < 1``.
        gamma: discount of the step returns.
        step_weight: weight of the step-level advantage.
        mode: ``"mean_norm"`` or ``"mean_std_norm"`` (both levels).
        episode_stats: ``"trajectory"`` or ``"step"`` (see the module docstring).
        similarity_threshold: 1.0 for exact anchors only.

    Returns:
        ``[N]`` advantages, and metrics ``frac_zero_std_groups`` (episode groups),
        ``step_group_size_mean``, ``frac_singleton_step_groups`` and
        ``frac_rows_in_shared_step_groups`` (the share of rows whose anchor state recurs
        in its episode group, so that their step advantage compares actions; the others
        get a step advantage of 0 and learn from the episode level alone).
    """
    if inputs.step is None or inputs.anchor_id is None:
        raise ValueError("gigpo needs the step and anchor_id columns")
    if episode_stats not in EPISODE_STATS:
        raise ValueError(f"episode_stats must be one of {EPISODE_STATS}, got {episode_stats!r}")
    if not 0.0 < similarity_threshold <= 1.0:
        raise ValueError(f"similarity_threshold must be in (0, 1], got {similarity_threshold}")
    if similarity_threshold < 1.0 and inputs.anchors is None:
        raise ValueError("similarity_threshold < 1 needs the anchors themselves (AdvantageInputs.anchors)")
    n = inputs.rewards.numel()
    if n == 0:
        return AdvantageOutput.no_rows()
    rewards = inputs.rewards.to(torch.float64)
    penalty = inputs.row_penalty()

    returns, traj_group, row_traj = trajectory_table(rewards, inputs.traj_id, inputs.group_id)
    score = returns[row_traj] - penalty  # [N] each row's episode score
    weight, units, row_group = episode_weights(row_traj, traj_group)
    if episode_stats == "step":  # every row counts once
        weight = torch.ones_like(weight)
        units = torch.zeros_like(units).index_add_(0, row_group, weight)
    episode_adv, constant = normalize_weighted(score, weight, row_group, units, mode, eps)

    anchor = inputs.anchor_id
    if similarity_threshold < 1.0:
        anchor = merge_similar_anchors(anchor, row_group, inputs.anchors, similarity_threshold)
    step_group, _ = pair_ids(row_group, anchor)
    step_returns = discounted_returns(rewards, inputs.traj_id, inputs.step, gamma) - penalty
    step_adv, _ = normalize_in_groups(step_returns, step_group, mode, eps)
    _, _, sizes, _ = group_moments(step_returns, step_group)

    adv = episode_adv + step_weight * step_adv
    metrics = {
        "frac_zero_std_groups": float(constant.float().mean()),
        "step_group_size_mean": float(sizes.mean()),
        "frac_singleton_step_groups": float((sizes == 1).float().mean()),
        "frac_rows_in_shared_step_groups": float((sizes[step_group] > 1).float().mean()),
    }
    return AdvantageOutput(adv.to(inputs.rewards.dtype), metrics)
