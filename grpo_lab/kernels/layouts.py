"""The layouts of packed sequences, which the attention of a packed forward reads.

- :class:`RowLayout`: one padded row holding a shared prefix once and then each member
  that continues it (a group's prompt and its responses: the ``group`` packing).
- :class:`TrieLayout`: one sequence holding a token trie in pre-order, every shared
  prefix once (the ``trie`` packing); a token attends its ancestors' tokens and the
  earlier tokens of its own node.

They sit on the ground floor with the kernels that read them: the training forward
builds them (:mod:`grpo_lab.training.trie`, :mod:`grpo_lab.training.shared_prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowLayout:
    """One packed row: ``prefix_len`` tokens, then members of ``member_lens`` tokens each."""

    prefix_len: int
    member_lens: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.prefix_len + sum(self.member_lens)


@dataclass(frozen=True)
class TrieLayout:
    """Nodes of a packed trie in pre-order.

    Attributes:
        node_start: packed offset of each node's first token.
        node_len: tokens in each node (>= 1).
        parent: each node's parent (-1 for a root); a parent comes before its children.
        depth: depth of each node's first token (the position id it starts at).
    """

    node_start: tuple[int, ...]
    node_len: tuple[int, ...]
    parent: tuple[int, ...]
    depth: tuple[int, ...]
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.node_start)
        if not (len(self.node_len) == len(self.parent) == len(self.depth) == n):
            raise ValueError("node_start, node_len, parent and depth must have one entry per node")
        pos = 0
        for v in range(n):
            if self.node_start[v] != pos or self.node_len[v] < 1:
                raise ValueError(f"node {v} starts at {self.node_start[v]} with {self.node_len[v]} tokens: nodes must "
                                 f"be non-empty and back to back from token 0 (expected start {pos})")
            if not -1 <= self.parent[v] < v:
                raise ValueError(f"node {v} has parent {self.parent[v]}: a parent must come before its children")
            p = self.parent[v]
            if p >= 0 and self.depth[v] != self.depth[p] + self.node_len[p]:
                raise ValueError(f"node {v} starts at depth {self.depth[v]}, not where its parent {p} ends")
            pos += self.node_len[v]

    def __hash__(self) -> int:
        return hash((self.node_start, self.node_len, self.parent))

    @property
    def num_nodes(self) -> int:
        return len(self.node_start)

    @property
    def length(self) -> int:
        """Tokens in the packed sequence."""
        return sum(self.node_len)

    @property
    def max_depth(self) -> int:
        """The longest row through the trie, in tokens."""
        return max((d + n for d, n in zip(self.depth, self.node_len)), default=0)

    def subtree_end(self) -> tuple[int, ...]:
        """Packed end of each node's subtree: its descendants are ``[end of node,
        subtree_end)`` (pre-order)."""
        if "subtree_end" not in self._cache:
            end = [s + n for s, n in zip(self.node_start, self.node_len)]
            for v in range(self.num_nodes - 1, -1, -1):
                p = self.parent[v]
                if p >= 0:
                    end[p] = max(end[p], end[v])
            self._cache["subtree_end"] = tuple(end)
        return self._cache["subtree_end"]

    def ancestor_ranges(self, v: int) -> list[tuple[int, int]]:
        """The packed ranges of node ``v``'s ancestors, root first, adjacent ranges merged
        (a first child sits right after its parent)."""
        chain = []
        p = self.parent[v]
        while p >= 0:
            chain.append((self.node_start[p], self.node_start[p] + self.node_len[p]))
            p = self.parent[p]
        merged: list[tuple[int, int]] = []
        for lo, hi in reversed(chain):
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return merged

    def token_depth(self) -> Tensor:
        """``[L]`` the depth (position id) of each packed token."""
        if "token_depth" not in self._cache:
            self._cache["token_depth"] = torch.cat(
                [torch.arange(d, d + n) for d, n in zip(self.depth, self.node_len)]) if self.num_nodes else \
                torch.zeros(0, dtype=torch.long)
        return self._cache["token_depth"]

    def node_of_token(self) -> Tensor:
        """``[L]`` the node of each packed token."""
        return torch.repeat_interleave(torch.arange(self.num_nodes), torch.tensor(self.node_len, dtype=torch.long))

    def dense_mask(self) -> Tensor:
        """``[L, L]`` bool: query ``i`` may attend key ``j`` (an ancestor node's token, or
        an earlier token of its own node). For checks on small tries."""
        n = self.num_nodes
        anc = torch.zeros(n, n, dtype=torch.bool)  # anc[v, u]: u is v or an ancestor of v
        for v in range(n):
            anc[v, v] = True
            if self.parent[v] >= 0:
                anc[v] |= anc[self.parent[v]]
        node = self.node_of_token()
        pos = torch.arange(self.length)
        mask = anc[node][:, node]
        same = node[:, None] == node[None, :]
        return mask & (~same | (pos[None, :] <= pos[:, None]))
