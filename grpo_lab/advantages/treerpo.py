"""TreeRPO: sibling-relative advantages from bottom-up node values.

Yang et al. 2025, "TreeRPO: Tree Relative Policy Optimization". Each prompt's responses
are sampled as a tree whose nodes are token segments (or agent steps). A node's value is
the mean reward of the leaves below it; the children of one parent form a group, and a
node's advantage is its value normalised among its siblings. Every node's tokens get
that node's advantage, so the signal is dense along each path.

Choices stated:

- A leaf's reward is the sum of the rewards on its path (with outcome rewards only,
  that is the leaf's reward); a leaf's value is that reward.
- The prompt is the root: the top-level nodes (``parent_id = -1``) of all trees of one
  prompt (``group_id``) are siblings of one another, as the prompt's children are in the
  paper. Several trees per prompt are then one tree whose root has more children.
- ``mode="mean_std_norm"`` (default, Bessel-corrected std) or ``"mean_norm"``; a sibling
  group of one, or of equal values, gets exactly 0.
- A row penalty (``AdvantageInputs.penalty``, ``algo.penalty_placement=row``) lowers
  that node's own value before it is compared with its siblings.
- Chains (no tree columns) are read as one path per episode: the first steps of a
  group's episodes are siblings (they get GRPO's advantage) and every later step is an
  only child (0). TreeRPO needs tree sampling to be more than that; the trainer refuses
  it without ``rollout=tree``.
"""

from __future__ import annotations

import torch

from .grouping import normalize_in_groups
from .registry import AdvantageInputs, AdvantageOutput, register_estimator
from .trees import path_sums, subtree_leaf_stats, tree_columns, tree_index


@register_estimator("treerpo")
def treerpo(inputs: AdvantageInputs, *, mode: str = "mean_std_norm", eps: float = 1e-6) -> AdvantageOutput:
    """Node value (mean reward of the leaves below) normalised among its siblings (TreeRPO, Yang et al. 2025).

    Args:
        inputs: one row per node: ``rewards``, ``group_id`` (the prompt), ``tree_id``,
            ``node_id``, ``parent_id`` (``[N]``).
        mode: ``"mean_std_norm"`` or ``"mean_norm"``.

    Returns:
        ``[N]`` advantages, and metrics ``frac_zero_std_groups`` (sibling groups without
        signal) and ``node_value_mean``.
    """
    n = inputs.rewards.numel()
    if n == 0:
        return AdvantageOutput.no_rows()
    index = tree_index(*tree_columns(inputs), group_id=inputs.group_id)
    returns = path_sums(index, inputs.rewards.to(torch.float64))
    total, count = subtree_leaf_stats(index, returns)
    value = total / count - inputs.row_penalty()
    adv, constant = normalize_in_groups(value, index.sibling_group, mode, eps)
    metrics = {"frac_zero_std_groups": float(constant.float().mean()), "node_value_mean": float(value.mean())}
    return AdvantageOutput(adv.to(inputs.rewards.dtype), metrics)
