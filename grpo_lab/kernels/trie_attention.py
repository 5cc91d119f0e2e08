"""Trie attention as a Triton kernel (forward and backward), and its PyTorch reference.

A packed trie (:class:`~grpo_lab.kernels.layouts.TrieLayout`) lays its nodes out in
pre-order. A query of node ``v`` attends to every token of ``v``'s ancestors and
causally to ``v``'s own tokens; so, seen from a key of node ``u``, the queries that
attend to it are ``u``'s own later tokens and every token of ``u``'s subtree, which
pre-order puts in one contiguous range right after ``u``.

This extends the shared-prefix kernel (:mod:`grpo_lab.kernels.shared_prefix_attention`,
whose prefix/member rows are the one-level case) from one prefix range per query tile to
a list of ancestor ranges (adjacent ancestors merged: a first child follows its parent),
walked by the forward and dQ passes; the dK/dV pass is the shared-prefix one unchanged,
each key tile visiting its own node's later queries and then its whole subtree, so the
dK/dV of a shared node accumulate the contributions of every descendant with no atomics.
The tiles, online softmax, soft-cap and tile configs are those of the shared-prefix
kernel, whose device functions are reused.

Layout: ``q`` ``[L, H, D]``, ``k``/``v`` ``[L, Hkv, D]``, the packed trie from token 0;
``L`` may exceed the trie's length (those tokens get zero output and gradients).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .attention import masked_attention
from .layouts import TrieLayout

from . import shared_prefix_attention as sp


triton, tl = sp.triton, sp.tl


# ----------------------------------------------------------------------------- tiling
@functools.lru_cache(maxsize=64)
def _query_blocks(layout: "TrieLayout", block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``([NB, 5], [NA, 2])`` int32: per query tile ``q_start, q_end, own_start, anc_lo,
    anc_hi`` (heaviest first), where rows ``anc_lo:anc_hi`` of the second table are the
    packed ranges of the node's ancestors."""
    ranges: list[tuple[int, int]] = []
    tiles = []
    for v in range(layout.num_nodes):
        anc = layout.ancestor_ranges(v)
        lo = len(ranges)
        ranges.extend(anc)
        seen = sum(b - a for a, b in anc)
        start, end = layout.node_start[v], layout.node_start[v] + layout.node_len[v]
        for q0 in range(start, end, block):
            tiles.append((q0, min(q0 + block, end), start, lo, len(ranges), seen + q0 - start))
    tiles.sort(key=lambda t: t[5], reverse=True)
    blocks = torch.tensor([t[:5] for t in tiles], dtype=torch.int32).reshape(-1, 5).to(device)
    return blocks, torch.tensor(ranges or [(0, 0)], dtype=torch.int32).reshape(-1, 2).to(device)


@functools.lru_cache(maxsize=64)
def _key_blocks(layout: "TrieLayout", block: int, device: torch.device) -> Tensor:
    """``[NB, 5]`` int32 in the shared-prefix kernel's key-tile format: ``k_start, k_end,
    own_end, extra_start, extra_end``, the extra queries being the node's subtree."""
    ends = layout.subtree_end()
    tiles = []
    for v in range(layout.num_nodes):
        start, end = layout.node_start[v], layout.node_start[v] + layout.node_len[v]
        for k0 in range(start, end, block):
            tiles.append((k0, min(k0 + block, end), end, end, ends[v]))
    tiles.sort(key=lambda t: (t[2] - t[0]) + (t[4] - t[3]), reverse=True)
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, 5).to(device)


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _trie_fwd_kernel(Q, K, V, O, LSE, BLOCKS, ANC, qk_scale, cap_pre, H, KV_GROUP,
                         s_qt, s_qh, s_kt, s_kh, s_ot, s_oh,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                         SOFTCAP: tl.constexpr):
        row, head = sp.kernel_tile(BLOCKS, H, tl.program_id(0))
        kv_head = head // KV_GROUP
        q_start, q_end, own_start = tl.load(row + 0), tl.load(row + 1), tl.load(row + 2)
        a_lo, a_hi = tl.load(row + 3), tl.load(row + 4)
        offs_m = q_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = sp.load_rows(Q, offs_m, head, s_qt, s_qh, offs_d, q_end, True)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for a in range(a_lo, a_hi):  # the ancestors, every key seen by every query of the tile
            lo, hi = tl.load(ANC + 2 * a), tl.load(ANC + 2 * a + 1)
            acc, m_i, l_i = sp.fwd_visible(acc, m_i, l_i, q, K, V, lo, hi, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                                            s_kt, s_kh, BLOCK_N, PREC, SOFTCAP)
        acc, m_i, l_i = sp.fwd_visible(acc, m_i, l_i, q, K, V, own_start, q_start, kv_head, offs_m, offs_d, qk_scale,
                                        cap_pre, s_kt, s_kh, BLOCK_N, PREC, SOFTCAP)
        acc, m_i, l_i = sp.fwd_range(acc, m_i, l_i, q, K, V, q_start, q_end, kv_head, offs_m, offs_d, qk_scale,
                                      cap_pre, s_kt, s_kh, True, True, BLOCK_N, PREC, SOFTCAP)
        m_ok = offs_m < q_end
        tl.store(O + offs_m[:, None] * s_ot + head * s_oh + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None])
        tl.store(LSE + offs_m * H + head, m_i + tl.log2(l_i), mask=m_ok)

    @triton.jit
    def _trie_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, BLOCKS, ANC, qk_scale, cap_pre, scale, H, KV_GROUP,
                        s_qt, s_qh, s_kt, s_kh,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                        SOFTCAP: tl.constexpr):
        row, head = sp.kernel_tile(BLOCKS, H, tl.program_id(0))
        kv_head = head // KV_GROUP
        q_start, q_end, own_start = tl.load(row + 0), tl.load(row + 1), tl.load(row + 2)
        a_lo, a_hi = tl.load(row + 3), tl.load(row + 4)
        offs_m = q_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < q_end
        q = sp.load_rows(Q, offs_m, head, s_qt, s_qh, offs_d, q_end, True)
        do = sp.load_rows(DO, offs_m, head, s_qt, s_qh, offs_d, q_end, True)
        o = sp.load_rows(O, offs_m, head, s_qt, s_qh, offs_d, q_end, True)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + offs_m * H + head, delta, mask=m_ok)
        lse = tl.load(LSE + offs_m * H + head, mask=m_ok, other=float("inf"))
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        for a in range(a_lo, a_hi):
            lo, hi = tl.load(ANC + 2 * a), tl.load(ANC + 2 * a + 1)
            dq = sp.dq_visible(dq, q, do, lse, delta, K, V, lo, hi, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                                s_kt, s_kh, BLOCK_N, PREC, SOFTCAP)
        dq = sp.dq_visible(dq, q, do, lse, delta, K, V, own_start, q_start, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                            s_kt, s_kh, BLOCK_N, PREC, SOFTCAP)
        dq = sp.dq_range(dq, q, do, lse, delta, K, V, q_start, q_end, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                          s_kt, s_kh, True, True, BLOCK_N, PREC, SOFTCAP)
        tl.store(DQ + offs_m[:, None] * s_qt + head * s_qh + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=m_ok[:, None])


# ----------------------------------------------------------------------------- launches
def launch_forward(q: Tensor, k: Tensor, v: Tensor, layout: "TrieLayout", scale: float, cfg: sp.PassConfig,
                   softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """The forward pass: ``o`` ``[L, H, D]`` and the base-2 log-sum-exp ``[L, H]``."""
    t, h, _ = q.shape
    o, lse = sp.alloc(q), sp.alloc(q, (t, h), torch.float32)
    blocks, anc = _query_blocks(layout, cfg.block_m, q.device)
    qk_scale, cap_pre, capped = sp.score_scalars(scale, softcap)
    if blocks.shape[0]:
        _trie_fwd_kernel[(blocks.shape[0] * h,)](q, k, v, o, lse, blocks, anc, qk_scale, cap_pre, h, h // k.shape[1],
                                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0),
                                                 o.stride(1), **sp.meta(q, cfg, capped))
    return o, lse


def launch_dq(q, k, v, o, do, lse, layout, scale, cfg: sp.PassConfig, softcap=None) -> tuple[Tensor, Tensor]:
    """The dQ pass: ``dq`` ``[L, H, D]`` and ``delta`` ``[L, H]``."""
    t, h, _ = q.shape
    dq, delta = sp.alloc(q), sp.alloc(q, (t, h), torch.float32)
    blocks, anc = _query_blocks(layout, cfg.block_m, q.device)
    qk_scale, cap_pre, capped = sp.score_scalars(scale, softcap)
    if blocks.shape[0]:
        _trie_dq_kernel[(blocks.shape[0] * h,)](q, k, v, o, do, lse, delta, dq, blocks, anc, qk_scale, cap_pre, scale, h,
                                                h // k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                                **sp.meta(q, cfg, capped))
    return dq, delta


def launch_dkdv(q, k, v, do, lse, delta, layout, scale, cfg: sp.PassConfig, softcap=None) -> tuple[Tensor, Tensor]:
    """The dK/dV pass (after :func:`launch_dq`, which writes ``delta``): the shared-prefix
    kernel's, over key tiles whose extra queries are their node's subtree."""
    h, hkv = q.shape[1], k.shape[1]
    dk, dv = sp.alloc(k), sp.alloc(v)
    blocks = _key_blocks(layout, cfg.block_n, q.device)
    qk_scale, cap_pre, capped = sp.score_scalars(scale, softcap)
    if blocks.shape[0]:
        sp.bwd_dkdv_kernel[(blocks.shape[0] * hkv,)](q, k, v, do, lse, delta, dk, dv, blocks, qk_scale, cap_pre, scale,
                                                      h, hkv, h // hkv, q.stride(0), q.stride(1), k.stride(0),
                                                      k.stride(1), **sp.meta(q, cfg, capped))
    return dk, dv


def _zero_tail(length: int, *tensors: Tensor) -> None:
    """Tokens past the trie get zero output and gradients."""
    for x in tensors:
        if x.shape[0] > length:
            x[length:] = 0


class _TrieAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, config, softcap):
        sp.require_triton()
        q, k, v = sp.dense(q), sp.dense(k), sp.dense(v)
        o, lse = launch_forward(q, k, v, layout, scale, config.fwd, softcap)
        _zero_tail(layout.length, o)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale, ctx.config, ctx.softcap = layout, scale, config, softcap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, delta = launch_dq(q, k, v, o, do, lse, ctx.layout, ctx.scale, ctx.config.dq, ctx.softcap)
        dk, dv = launch_dkdv(q, k, v, do, lse, delta, ctx.layout, ctx.scale, ctx.config.dkdv, ctx.softcap)
        _zero_tail(ctx.layout.length, dq, dk, dv)
        return dq, dk, dv, None, None, None, None


def _check(q: Tensor, k: Tensor, v: Tensor, layout: "TrieLayout", value_dim_may_differ: bool = False) -> None:
    """Shapes as the shared-prefix kernel's (the reference also takes multi-head latent
    attention's other value width), and a trie that fits in them."""
    sp.check_shapes(q, k, v, value_dim_may_differ)
    if layout.length > q.shape[0]:
        raise ValueError(f"the trie holds {layout.length} tokens but q has {q.shape[0]}")


def trie_attention(q: Tensor, k: Tensor, v: Tensor, layout: "TrieLayout", scale: float | None = None,
                   block_m: int | None = None, block_n: int | None = None, config: sp.KernelConfig | None = None,
                   softcap: float | None = None) -> Tensor:
    """Trie attention with the Triton kernel (differentiable).

    Args:
        q: ``[L, H, D]``; k, v: ``[L, Hkv, D]``.
        layout: the packed trie.
        scale: softmax scale (default ``D ** -0.5``).
        block_m, block_n: one tile shape for every pass (tests); by default the tuned
            shapes of the shared-prefix kernel (``config`` to set them).
        softcap: attention logit soft-cap (Gemma2), or ``None``.

    Returns:
        ``[L, H, D]``.
    """
    _check(q, k, v, layout)
    if q.numel() >= 2**31:
        raise ValueError(f"q has {q.numel()} elements; the kernel indexes with 32-bit offsets: split the micro-batch")
    config = sp.kernel_config(q.shape[2], softcap, config, block_m, block_n)
    return _TrieAttention.apply(q, k, v, layout, scale if scale is not None else q.shape[2] ** -0.5, config, softcap)


@dataclass(frozen=True)
class NodeBatch:
    """Nodes of a trie whose attention runs as one padded call: ``nodes`` of up to ``Q``
    query tokens each, every one with up to ``K`` keys (its ancestors' tokens, then its own).

    Attributes:
        query_index: ``[B, Q]`` packed position of each query (padding repeats a real one).
        key_index: ``[B, K]`` packed position of each key (padding: position 0).
        allowed: ``[B, Q, K]`` bool: the causal trie mask (a padded query sees key 0 only,
            so that no softmax row is empty).
        query_depth, key_depth: ``[B, Q]``, ``[B, K]``: the position ids (depths) of both.
    """

    query_index: Tensor
    key_index: Tensor
    allowed: Tensor
    query_depth: Tensor
    key_depth: Tensor

    def to(self, device: torch.device) -> "NodeBatch":
        return NodeBatch(*(getattr(self, f).to(device) for f in ("query_index", "key_index", "allowed", "query_depth",
                                                                  "key_depth")))


#: a node joins a batch while the padded batch costs at most this much more than its nodes alone
BATCH_SLACK = 1.5


@functools.lru_cache(maxsize=64)
def node_batches(layout: "TrieLayout", device: torch.device) -> tuple[tuple[NodeBatch, ...], Tensor]:
    """The trie's nodes in padded batches of similar shape (sorted by keys, then queries,
    a node joining the batch before it while the padded ``B * Q * K`` stays within
    :data:`BATCH_SLACK` of the nodes' own ``sum(q_i * k_i)``), and ``[L]``: where each
    packed token's output sits in the batches' outputs, flattened and concatenated.

    A node's keys are the tokens at depths ``0 .. depth + len`` on its path, so it has
    ``depth + len`` of them; its path's packed positions extend its parent's."""
    starts, lens, depth = (np.asarray(x, dtype=np.int64) for x in (layout.node_start, layout.node_len, layout.depth))
    keys = depth + lens  # [N] keys of each node
    paths: list[np.ndarray] = []  # per node, the packed position of each depth on its path
    for v, parent in enumerate(layout.parent):
        own = np.arange(starts[v], starts[v] + lens[v])
        paths.append(own if parent < 0 else np.concatenate([paths[parent][:depth[v]], own]))
    order = np.lexsort((lens, keys))
    groups: list[list[int]] = []
    padded_q = padded_k = area = 0
    for v in order.tolist():
        q, k = int(lens[v]), int(keys[v])
        if groups:
            b = len(groups[-1]) + 1
            if b * max(padded_q, q) * max(padded_k, k) <= BATCH_SLACK * (area + q * k):
                groups[-1].append(v)
                padded_q, padded_k, area = max(padded_q, q), max(padded_k, k), area + q * k
                continue
        groups.append([v])
        padded_q, padded_k, area = q, k, q * k
    batches, flat_of_token, offset = [], np.empty(layout.length, dtype=np.int64), 0
    depth_of = layout.token_depth().numpy()
    for group in groups:
        nodes = np.asarray(group)
        b, q_max, k_max = len(group), int(lens[nodes].max()), int(keys[nodes].max())
        rows_q = np.arange(q_max)[None, :]  # [1, Q]
        query_index = starts[nodes, None] + np.minimum(rows_q, lens[nodes, None] - 1)  # [B, Q] padding repeats the last
        key_index = np.zeros((b, k_max), dtype=np.int64)
        for row, v in enumerate(group):
            key_index[row, :keys[v]] = paths[v]
        cols = np.arange(k_max)[None, None, :]  # [1, 1, K]
        real_q = rows_q[:, :, None] < lens[nodes, None, None]  # [B, Q, 1]
        allowed = real_q & (cols <= depth[nodes, None, None] + rows_q[:, :, None])  # [B, Q, K] causal on the path
        allowed |= ~real_q & (cols == 0)  # a padded query sees key 0 only: no empty softmax row
        valid = rows_q < lens[nodes, None]  # [B, Q]
        flat_of_token[query_index[valid]] = offset + np.flatnonzero(valid)
        batches.append(NodeBatch(*(torch.from_numpy(x) for x in (
            query_index, key_index, allowed, depth_of[query_index], depth_of[key_index]))).to(device))
        offset += b * q_max
    return tuple(batches), torch.from_numpy(flat_of_token).to(device)


def trie_attention_reference(q: Tensor, k: Tensor, v: Tensor, layout: "TrieLayout", scale: float | None = None,
                             softcap: float | None = None, window: int | None = None,
                             chunk: int | None = None) -> Tensor:
    """The same function in PyTorch: the nodes' attention in a few padded SDPA calls
    (:func:`node_batches`), each query over its ancestors' keys and causally over its
    own node's (``[L, H, D]`` in and out).

    Position-dependent masks apply by depth, as the model's own masks apply by position
    in an unpacked row: ``window`` (a sliding window: keys at depths above ``d - window``)
    and ``chunk`` (chunked attention: keys in the query's chunk, ``depth // chunk``)."""
    _check(q, k, v, layout, value_dim_may_differ=True)
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    batches, flat_of_token = node_batches(layout, q.device)
    outs = []
    for nb in batches:
        b, q_max = nb.query_index.shape
        k_max = nb.key_index.shape[1]
        allowed = nb.allowed
        if window is not None:
            allowed = allowed & (nb.key_depth[:, None, :] > nb.query_depth[:, :, None] - window)
        if chunk is not None:
            allowed = allowed & (nb.key_depth[:, None, :] // chunk == nb.query_depth[:, :, None] // chunk)
        if window is not None or chunk is not None:
            allowed = allowed | (~allowed.any(-1, keepdim=True) & (torch.arange(k_max, device=q.device) == 0))
        # index_select: a reproducible backward (advanced indexing adds repeats in thread order on CPU)
        qb = q.index_select(0, nb.query_index.flatten()).view(b, q_max, h, -1).transpose(1, 2)  # [B, H, Q, D]
        kb = k.index_select(0, nb.key_index.flatten()).view(b, k_max, h, -1).transpose(1, 2)  # [B, H, K, D]
        vb = v.index_select(0, nb.key_index.flatten()).view(b, k_max, h, -1).transpose(1, 2)  # [B, H, K, Dv]
        out = masked_attention(qb, kb, vb, allowed[:, None], scale, softcap)  # [B, H, Q, Dv]
        outs.append(out.transpose(1, 2).reshape(b * q_max, h, -1))
    out = torch.index_select(torch.cat(outs), 0, flat_of_token)  # [L_trie, H, Dv]
    if q.shape[0] > layout.length:
        out = torch.cat([out, q.new_zeros(q.shape[0] - layout.length, *out.shape[1:])])
    return out
