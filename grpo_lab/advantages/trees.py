"""Tree bookkeeping shared by the tree estimators (vectorized; loops run over depth levels).

A tree batch has one row per node. ``tree_id`` names the tree, ``node_id`` the node
inside it, ``parent_id`` its parent's ``node_id`` in the same tree (-1 for a node that
hangs from the prompt). A node that is no row's parent is a leaf.

Siblings are the children of one parent. The nodes that hang from the prompt are the
prompt's children, whatever tree they start: with ``group_id`` (the prompt) given, the
top-level nodes of all trees of one prompt form one sibling group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .grouping import pair_ids


@dataclass(frozen=True)
class TreeIndex:
    """``parent`` ``[N]``: row index of each row's parent (-1 at the top); ``depth`` ``[N]``
    (0 at the top); ``is_leaf`` ``[N]``; ``sibling_group`` ``[N]``: dense id of (tree,
    parent) below the top, and of the prompt for top-level nodes (see the module docstring)."""

    parent: Tensor
    depth: Tensor
    is_leaf: Tensor
    sibling_group: Tensor


def tree_index(tree_id: Tensor, node_id: Tensor, parent_id: Tensor, group_id: Tensor | None = None) -> TreeIndex:
    """Resolve parent rows and depths; raises on duplicate nodes, missing parents or cycles.
    ``group_id`` ``[N]`` (the prompt of each row) makes the top-level nodes of a prompt's
    trees siblings; without it each tree's top-level nodes are siblings of each other only."""
    n = tree_id.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return TreeIndex(empty, empty, torch.zeros(0, dtype=torch.bool), empty)
    if bool((node_id < 0).any()):
        raise ValueError("node_id must be >= 0 for every row of a tree batch")
    key = tree_id * (int(node_id.max()) + 1) + node_id
    order = torch.argsort(key)
    sorted_key = key[order]
    if bool((sorted_key[1:] == sorted_key[:-1]).any()):
        bad = int(torch.nonzero(sorted_key[1:] == sorted_key[:-1])[0])
        raise ValueError(f"node {int(node_id[order[bad]])} appears twice in tree {int(tree_id[order[bad]])}")
    top = parent_id < 0
    parent_key = tree_id * (int(node_id.max()) + 1) + parent_id.clamp(min=0)
    pos = torch.searchsorted(sorted_key, parent_key).clamp(max=n - 1)
    found = sorted_key[pos] == parent_key
    if bool((~top & ~found).any()):
        bad = int(torch.nonzero(~top & ~found)[0])
        raise ValueError(f"row {bad}: parent {int(parent_id[bad])} of node {int(node_id[bad])} is not in tree {int(tree_id[bad])}")
    parent = torch.where(top, torch.full_like(pos, -1), order[pos])
    depth = torch.zeros(n, dtype=torch.long)
    current = parent.clone()
    for _ in range(n):
        alive = current >= 0
        if not bool(alive.any()):
            break
        depth += alive.long()
        current = torch.where(alive, parent[current.clamp(min=0)], current)
    else:
        raise ValueError("the parent links contain a cycle")
    has_child = torch.zeros(n, dtype=torch.bool)
    has_child[parent[parent >= 0]] = True
    if group_id is None:
        sibling_group, _ = pair_ids(tree_id, parent_id)
    else:  # top-level nodes by prompt, the others by (tree, parent)
        owner, _ = pair_ids(top.long(), torch.where(top, group_id, tree_id))
        sibling_group, _ = pair_ids(owner, torch.where(top, torch.full_like(parent_id, -1), parent_id))
    return TreeIndex(parent, depth, ~has_child, sibling_group)


def subtree_leaf_stats(index: TreeIndex, leaf_values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of ``leaf_values`` over the leaves below each node, and their count (``[N]``
    each; a leaf counts itself). Values at non-leaf rows are ignored."""
    total = torch.where(index.is_leaf, leaf_values, torch.zeros_like(leaf_values))
    count = index.is_leaf.to(leaf_values.dtype)
    for level in range(int(index.depth.max()) if index.depth.numel() else 0, 0, -1):
        rows = torch.nonzero(index.depth == level).flatten()
        total = total.index_add(0, index.parent[rows], total[rows])
        count = count.index_add(0, index.parent[rows], count[rows])
    return total, count


def path_sums(index: TreeIndex, values: Tensor) -> Tensor:
    """``[N]``: the sum of ``values`` from the top of the tree down to each node, inclusive."""
    out = values.clone()
    for level in range(1, int(index.depth.max()) + 1 if index.depth.numel() else 0):
        rows = torch.nonzero(index.depth == level).flatten()
        out[rows] = values[rows] + out[index.parent[rows]]
    return out


def tree_columns(inputs) -> tuple[Tensor, Tensor, Tensor]:
    """``(tree_id, node_id, parent_id)`` of ``inputs``; chains (all -1, or absent) become
    one path-shaped tree per episode: node = step, parent = step - 1."""
    if inputs.tree_id is not None and bool((inputs.tree_id >= 0).all()):
        if inputs.node_id is None or inputs.parent_id is None:
            raise ValueError("tree_id is set but node_id or parent_id is missing")
        return inputs.tree_id, inputs.node_id, inputs.parent_id
    if inputs.tree_id is not None and bool((inputs.tree_id >= 0).any()):
        raise ValueError("tree_id is set on some rows and -1 on others")
    if inputs.step is None:
        raise ValueError("chains need the step column to be read as trees")
    return inputs.traj_id, inputs.step, inputs.step - 1
