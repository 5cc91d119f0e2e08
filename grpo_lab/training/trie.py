"""Trie-packed training forward: every distinct token prefix of a micro-batch encoded once.

Rows that share token prefixes (the G members of a group share their prompt; the turns
of a conversation episode extend one another, :mod:`grpo_lab.rollout.conversation`;
tree-sampled branches share their ancestors) are packed as one token trie. A token's
hidden states depend only on the tokens before it and its position, so a prefix that
several rows share needs encoding once:

- the trie is a radix tree: a *node* is a maximal run of tokens without a branch, laid
  out in pre-order (a node, then its subtree), so the packed sequence holds every
  distinct prefix token once and each node's descendants sit in one contiguous range;
- a token's position id is its depth (its position in every row through it);
- in attention, a token sees every token of its ancestor nodes and the tokens of its own
  node up to itself: exactly the keys its rows see in the ordinary forward.

So log-probs and gradients equal the per-row forward's (up to summation order;
``tests/test_trie.py``). Prefix Grouper's one-level layout
(:mod:`~grpo_lab.training.shared_prefix`) is the special case of a root with leaf
children; it stays available as ``trainer.packing=group``.

The attention: :func:`grpo_lab.kernels.trie_attention.trie_attention_reference` in
PyTorch (one SDPA call per node, over its ancestors' keys and its own; the dense block
mask of :meth:`TrieLayout.dense_mask` checks it), or the Triton kernel
:func:`grpo_lab.kernels.trie_attention.trie_attention`. Both plug into ``transformers``
through the same registered attention as the shared-prefix forward, which dispatches on
the layout's type, and the same receipt proves that every layer took the packed path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .forward import pad_rows, token_logprobs
from ..kernels.layouts import TrieLayout
from .shared_prefix import packed_forward


@dataclass
class PackedTrie:
    """A micro-batch packed as a trie.

    Attributes:
        layout: the nodes.
        input_ids: ``[L]`` the packed tokens; positions: ``[L]`` their position ids.
        index: per row, ``[n_i]`` the packed position of each of its tokens.
    """

    layout: TrieLayout
    input_ids: Tensor
    positions: Tensor
    index: list[Tensor]

    @property
    def row_tokens(self) -> int:
        """Tokens of the rows laid out one by one."""
        return sum(int(i.numel()) for i in self.index)


def sorted_rows(seqs: Sequence[Tensor]) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """``seqs`` as numpy rows, their sorted order (rows through any prefix adjacent), and
    ``[N]`` the longest common prefix of each row, in that order, with the one before it
    (0 for the first), compared on the padded batch at once."""
    rows = [s.detach().to("cpu", torch.long).flatten().numpy() for s in seqs]
    order = sorted(range(len(rows)), key=lambda i: rows[i].tolist())
    n = len(order)
    if n < 2:
        return order, rows, np.zeros(n, dtype=np.int64)
    padded = np.full((n, max(len(r) for r in rows)), -1, dtype=np.int64)  # token ids are >= 0
    for k, i in enumerate(order):
        padded[k, :len(rows[i])] = rows[i]
    same = (padded[1:] == padded[:-1]) & (padded[1:] >= 0)
    return order, rows, np.concatenate([[0], np.cumprod(same, axis=1).sum(1)])


def _branch_depths(adj: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """Per sorted row, the depths inside it where the trie branches: ``lcp(i, j)`` for the
    rows ``j`` that leave row ``i`` there while both go on (``lcp(i, j)`` is the minimum
    of the adjacent lcps between them)."""
    n = len(adj)
    lcp = np.zeros((n, n), dtype=np.int64)
    for i in range(n - 1):
        lcp[i, i + 1:] = np.minimum.accumulate(adj[i + 1:])
    lcp = lcp + lcp.T
    shorter = np.minimum(lengths[:, None], lengths[None, :])
    branch = (lcp < shorter) & (lcp > 0)
    np.fill_diagonal(branch, False)
    return [np.unique(lcp[i][branch[i]]).tolist() for i in range(n)]


def build_trie(seqs: Sequence[Tensor]) -> PackedTrie:
    """Pack one-dimensional token rows (each non-empty) as a trie (module docstring).

    Rows are sorted, so that the rows through any prefix are adjacent; each row's nodes
    are the runs between the depths where the trie branches on it. A row's node is the
    previous row's node where both share it; a previous row's last node that the new row
    extends without a branch grows; the rest are new nodes, children of the row's node
    before them. Identical rows read the same positions.
    """
    if not seqs:
        raise ValueError("build_trie got no rows: a micro-batch to pack needs at least one")
    empty = [i for i, s in enumerate(seqs) if s.numel() == 0]
    if empty:
        raise ValueError(f"every row needs at least one token; rows {empty[:5]} are empty")
    order, rows, adj = sorted_rows(seqs)
    lengths = np.array([len(rows[i]) for i in order], dtype=np.int64)
    depths = _branch_depths(adj, lengths)
    # nodes as [representative row, first depth, end depth, parent]
    nodes: list[list[int]] = []
    paths: list[list[int]] = []  # per sorted row, its nodes
    for k, row in enumerate(order):
        bounds = [0, *depths[k], int(lengths[k])]
        shared = int(adj[k])
        prev = paths[-1] if paths else []
        path: list[int] = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            old = next((v for v in prev if nodes[v][1] == a), None)
            if old is not None and b <= shared:
                path.append(old)  # on the common prefix
            elif old is not None and a < shared:  # the previous row ended inside this run: it grows
                if nodes[old][2] != shared:
                    raise AssertionError("trie construction: a shared node ends off a row end")
                nodes[old][0], nodes[old][2] = row, b
                path.append(old)
            else:
                nodes.append([row, a, b, path[-1] if path else -1])
                path.append(len(nodes) - 1)
        paths.append(path)
    node_len = [b - a for _, a, b, _ in nodes]
    starts = np.concatenate([[0], np.cumsum(node_len)[:-1]]).tolist()
    layout = TrieLayout(tuple(starts), tuple(node_len), tuple(p for *_, p in nodes),
                        tuple(a for _, a, _, _ in nodes))
    input_ids = torch.from_numpy(np.concatenate([rows[r][a:b] for r, a, b, _ in nodes]))
    positions = torch.from_numpy(np.concatenate([np.arange(a, b) for _, a, b, _ in nodes]))
    index: list[Tensor] = [torch.empty(0)] * len(seqs)
    for k, row in enumerate(order):
        n = int(lengths[k])
        index[row] = torch.from_numpy(np.concatenate([
            np.arange(starts[v], starts[v] + min(nodes[v][2], n) - nodes[v][1]) for v in paths[k]]))
    return PackedTrie(layout, input_ids, positions, index)


def trie_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Tensor],
    response_ids: Sequence[Tensor],
    temperature: float = 1.0,
    with_entropy: bool = False,
    pad_id: int = 0,
    attention: str = "reference",
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`~grpo_lab.training.forward.response_logprobs` with the rows packed as one
    trie (``model`` must have gone through
    :func:`~grpo_lab.training.shared_prefix.enable_shared_prefix`).

    Args:
        prompt_ids: ``N`` tensors ``[P_i]`` (``P_i >= 1``); response_ids: ``N`` tensors ``[R_i]``.
        attention: ``"reference"`` (PyTorch) or ``"triton"`` (``grpo_lab.kernels``).

    Returns:
        ``logprobs`` ``[N, R]``, ``mask`` ``[N, R]``, ``entropy`` ``[N, R]`` or None.
    """
    n = len(prompt_ids)
    if len(response_ids) != n:
        raise ValueError(f"{n} prompts but {len(response_ids)} responses")
    if any(p.numel() == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    if any(r.numel() == 0 for r in response_ids):
        raise ValueError("every response needs at least one token")
    device = next(model.parameters()).device
    packed = build_trie([torch.cat([p.cpu(), r.cpu()]) for p, r in zip(prompt_ids, response_ids)])
    logits = packed_forward(model, packed.input_ids[None].to(device), packed.positions[None].to(device),
                            packed.layout, attention)[0]  # [L, V]
    # response token j of row i sits at depth P_i + j and is predicted at depth P_i + j - 1
    pred = pad_rows([packed.index[i][p.numel() - 1: p.numel() - 1 + r.numel()]
                     for i, (p, r) in enumerate(zip(prompt_ids, response_ids))], 0, torch.long).to(device)  # [N, R]
    # index_select, not logits[pred]: rows share positions, and on CPU the backward of
    # advanced indexing adds duplicates in a thread-dependent order (not reproducible)
    picked = torch.index_select(logits, 0, pred.flatten()).view(*pred.shape, logits.shape[-1])  # [N, R, V]
    targets = pad_rows(list(response_ids), pad_id, torch.long).to(device)
    mask = pad_rows([torch.ones(r.numel()) for r in response_ids], 0.0).to(device)
    logprobs, entropy = token_logprobs(picked, targets, temperature, with_entropy, entropy_grad)
    logprobs, entropy = logprobs * mask, entropy * mask if with_entropy else None
    return logprobs, mask, entropy
