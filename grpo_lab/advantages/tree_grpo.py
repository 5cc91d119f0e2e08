"""Tree-GRPO: intra-tree plus inter-tree group-relative advantages.

Ji et al. 2025, "Tree Search for LLM Agent Reinforcement Learning". Each prompt grows
several trees whose nodes are agent steps; every leaf ends a complete trajectory (the
path from the top of its tree). A leaf's return is normalised twice and the two are
added:

    A(leaf) = norm over all leaves of the prompt (inter-tree)
            + norm over the leaves of its own tree (intra-tree)

Choices stated:

- A leaf's return is the sum of the rewards on its path (with outcome rewards only,
  that is the leaf's reward).
- An inner node lies on the paths of several leaves. The reference implementation
  trains every root-to-leaf path as its own sequence, so a shared node's tokens are
  trained once per leaf below it: ``node_reduce="sum"`` (default) gives the node the
  sum of those leaves' advantages, which is that gradient without duplicating tokens.
  ``node_reduce="mean"`` gives their mean instead (every node weighs like one path).
- ``mode="mean_std_norm"`` (default, Bessel-corrected std) or ``"mean_norm"``; a group of
  leaves whose returns are all equal, a single leaf included, contributes exactly 0
  (the reference returns the raw reward for a group of one).
- Chains (no tree columns) are read as one path per episode, which makes the intra-tree
  term 0 and the whole estimator equal to GRPO with group std (either ``node_reduce``).
- The invalid-action penalty must be in the rewards (``algo.penalty_placement=episode``,
  so it enters the return of every path through the penalised node): an inner node's
  advantage is built from the leaves below it, and there is no score of its own that a
  row penalty could lower. A row penalty (``AdvantageInputs.penalty``) raises.
"""

from __future__ import annotations

import torch

from .grouping import dense_ids, normalize_in_groups
from .registry import AdvantageInputs, AdvantageOutput, register_estimator
from .trees import path_sums, subtree_leaf_stats, tree_columns, tree_index


@register_estimator("tree_grpo")
def tree_grpo(
    inputs: AdvantageInputs, *, mode: str = "mean_std_norm", node_reduce: str = "sum", eps: float = 1e-6
) -> AdvantageOutput:
    """Leaf return normalised over the prompt's leaves plus over its tree's leaves (Tree-GRPO, Ji et al. 2025).

    Args:
        inputs: one row per node: ``rewards``, ``group_id`` (the prompt), ``tree_id``,
            ``node_id``, ``parent_id`` (``[N]``).
        mode: ``"mean_std_norm"`` or ``"mean_norm"``.
        node_reduce: ``"sum"`` or ``"mean"`` over the leaves below an inner node.

    Returns:
        ``[N]`` advantages (inner nodes: sum or mean over their leaves), and metrics
        ``frac_zero_std_groups`` (prompts whose leaves all have equal returns) and
        ``leaves_per_tree``.
    """
    if node_reduce not in ("sum", "mean"):
        raise ValueError(f"node_reduce must be 'sum' or 'mean', got {node_reduce!r}")
    if inputs.penalty is not None and bool((inputs.penalty != 0).any()):
        raise ValueError("tree_grpo takes the invalid-action penalty in the rewards (algo.penalty_placement=episode), "
                         "not as a row penalty: an inner node has no score of its own to lower")
    n = inputs.rewards.numel()
    if n == 0:
        return AdvantageOutput.no_rows()
    tree_id, node_id, parent_id = tree_columns(inputs)
    index = tree_index(tree_id, node_id, parent_id)
    rewards = inputs.rewards.to(torch.float64)
    returns = path_sums(index, rewards)
    leaves = torch.nonzero(index.is_leaf).flatten()
    prompt, _ = dense_ids(inputs.group_id[leaves])
    tree, num_trees = dense_ids(tree_id[leaves])
    inter, constant = normalize_in_groups(returns[leaves], prompt, mode, eps)
    intra, _ = normalize_in_groups(returns[leaves], tree, mode, eps)
    leaf_adv = torch.zeros(n, dtype=torch.float64)
    leaf_adv[leaves] = inter + intra
    total, count = subtree_leaf_stats(index, leaf_adv)
    metrics = {"frac_zero_std_groups": float(constant.float().mean()), "leaves_per_tree": leaves.numel() / num_trees}
    adv = total if node_reduce == "sum" else total / count
    return AdvantageOutput(adv.to(inputs.rewards.dtype), metrics)
