"""Shared-prefix attention for packed groups, as a Triton kernel (forward and backward).

A packed row holds a group ``[P; R1; ...; RG]``: prefix queries attend causally inside
``P``; each member's queries attend to all of ``P`` and causally to their own tokens,
never to another member. For a query ``t`` the allowed keys are two contiguous ranges,
``[row_start, row_start + P)`` and ``[segment_start(t), t]``, so the kernel walks the
prefix keys once per member query tile and never repeats them in memory.

Flash-attention style (Dao 2023, FlashAttention-2): tiles, online softmax in base 2, no
score matrix in memory; the forward saves the log-sum-exp for the backward. Every key
range is split into whole tiles, which run without masks, and at most one masked tail
tile; only the tiles on a segment's diagonal apply the causal mask. The backward has one
pass for dQ (per query tile; it also computes ``delta = rowsum(dO * O)`` for its rows) and
one for dK/dV (per key tile and KV head, looping over the query heads that share it and
over every query that sees the key: a prefix key tile visits the prefix queries after it
and all member queries of its row), so no atomics are needed. Each pass has its own tile
shape and warp count (:data:`TUNED`, measured by ``benchmarks/kernel.py --tune``), and
tiles are launched heaviest first.

Attention logit soft-capping (Gemma2: ``cap * tanh(scores / cap)`` before the softmax)
is a compile-time option of every pass; its backward multiplies by ``1 - tanh^2``.

Layout (varlen, like flash-attention's ``cu_seqlens``): ``q`` ``[T, H, D]``, ``k``/``v``
``[T, Hkv, D]`` hold the packed rows; the rows are described by
:class:`~grpo_lab.kernels.layouts.RowLayout` entries (prefix length and member
lengths) and start back to back from token 0, or at ``row_starts`` (padded rows, as a
``[B, L]`` batch flattened to ``[B*L]``). Tokens outside every row get zero output and
zero gradients. Grouped-query attention: ``H`` a multiple of ``Hkv``.

``shared_prefix_attention_reference`` computes the same function in PyTorch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .attention import masked_attention

try:  # Triton is optional: the reference works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PassConfig:
    """Launch shape of one pass: ``block_m`` query rows and ``block_n`` key rows per tile."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class KernelConfig:
    """One :class:`PassConfig` for each of the forward, dQ and dK/dV passes."""

    fwd: PassConfig
    dq: PassConfig
    dkdv: PassConfig

    @classmethod
    def uniform(cls, block_m: int, block_n: int) -> "KernelConfig":
        return cls(*(PassConfig(block_m, block_n),) * 3)


#: Per head dimension, the tile shape of each pass. Not yet measured: these are starting
#: points in the shapes Triton's fused-attention tutorial uses on Hopper (large query
#: tiles for the forward and dQ, large key tiles for dK/dV), to be replaced by what
#: ``benchmarks/kernel.py --tune`` finds on a GPU. Other head dims use ``DEFAULT``.
TUNED: dict[int, KernelConfig] = {
    64: KernelConfig(PassConfig(128, 64, 4, 3), PassConfig(128, 32, 4, 3), PassConfig(32, 128, 4, 3)),
    128: KernelConfig(PassConfig(128, 64, 8, 3), PassConfig(128, 32, 8, 3), PassConfig(32, 128, 8, 3)),
}
DEFAULT = KernelConfig(PassConfig(64, 64, 4, 2), PassConfig(64, 64, 4, 2), PassConfig(64, 64, 4, 2))


def config_for(head_dim: int) -> KernelConfig:
    return TUNED.get(head_dim, DEFAULT)


# ----------------------------------------------------------------------------- tiling
def _row_starts(layout, row_starts) -> tuple[int, ...]:
    if row_starts is None:
        starts, pos = [], 0
        for row in layout:
            starts.append(pos)
            pos += row.length
        return tuple(starts)
    return tuple(int(s) for s in row_starts)


def _segments(layout, row_starts=None) -> list[tuple[int, int, int, int, bool, int]]:
    """``(row_start, prefix_len, segment_start, segment_len, is_prefix, row_end)`` of every
    non-empty segment (rows back to back from token 0 unless ``row_starts`` is given)."""
    out = []
    for row, start in zip(layout, _row_starts(layout, row_starts)):
        end = start + row.length
        if row.prefix_len > 0:
            out.append((start, row.prefix_len, start, row.prefix_len, True, end))
        pos = start + row.prefix_len
        for n in row.member_lens:
            if n > 0:
                out.append((start, row.prefix_len, pos, n, False, end))
            pos += n
    return out


@functools.lru_cache(maxsize=256)
def _query_blocks(layout: tuple, row_starts: tuple, block: int, device: torch.device) -> Tensor:
    """``[NB, 5]`` int32, heaviest tile first: per query tile ``q_start, q_end,
    prefix_start, prefix_end, own_start`` (a prefix tile has an empty prefix range and
    ``own_start`` = row start)."""
    rows = []
    for row_start, p, seg_start, n, is_prefix, _ in _segments(layout, row_starts):
        for q0 in range(seg_start, seg_start + n, block):
            pe = row_start if is_prefix else row_start + p
            rows.append((q0, min(q0 + block, seg_start + n), row_start, pe, seg_start))
    rows.sort(key=lambda r: (r[3] - r[2]) + (r[1] - r[4]), reverse=True)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 5).to(device)


@functools.lru_cache(maxsize=256)
def _key_blocks(layout: tuple, row_starts: tuple, block: int, device: torch.device) -> Tensor:
    """``[NB, 5]`` int32, heaviest tile first: per key tile ``k_start, k_end, own_end,
    extra_start, extra_end``: queries ``[k_start, own_end)`` of its own segment see it
    causally, and the member queries ``[extra_start, extra_end)`` see all of it (prefix
    tiles only)."""
    rows = []
    for row_start, p, seg_start, n, is_prefix, row_end in _segments(layout, row_starts):
        for k0 in range(seg_start, seg_start + n, block):
            extra = (row_start + p, row_end) if is_prefix else (0, 0)
            rows.append((k0, min(k0 + block, seg_start + n), seg_start + n, *extra))
    rows.sort(key=lambda r: (r[2] - r[0]) + (r[4] - r[3]), reverse=True)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 5).to(device)


@functools.lru_cache(maxsize=256)
def _uncovered(layout: tuple, row_starts: tuple, total: int, device: torch.device) -> Tensor | None:
    """Indices of the tokens in ``[0, total)`` that no row covers (padding), or None."""
    covered = torch.zeros(total, dtype=torch.bool)
    for row, start in zip(layout, row_starts):
        covered[start:start + row.length] = True
    if bool(covered.all()):
        return None
    return torch.nonzero(~covered).flatten().to(device)


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def load_rows(X, offs, head, s_t, s_h, offs_d, hi, MASK: tl.constexpr):
        """Rows ``offs`` of one head of a ``[T, H, D]`` tensor (rows at or past ``hi``
        read as zero when ``MASK``)."""
        ptrs = X + offs[:, None] * s_t + head * s_h + offs_d[None, :]
        if MASK:
            return tl.load(ptrs, mask=(offs < hi)[:, None], other=0.0)
        return tl.load(ptrs)

    @triton.jit
    def _scores(qk, qk_scale, cap_pre, SOFTCAP: tl.constexpr):
        """Base-2 logits of raw products ``qk`` and, with ``SOFTCAP``, the derivative of the
        cap ``1 - tanh^2`` (else ``qk`` itself, unused). Without the cap ``qk_scale`` is
        ``scale * log2(e)``; with it, ``cap * log2(e)`` and ``cap_pre = scale / cap``."""
        if SOFTCAP:
            t = 1.0 - 2.0 / (tl.exp(2.0 * qk * cap_pre) + 1.0)  # tanh, finite for every input
            return t * qk_scale, 1.0 - t * t
        return qk * qk_scale, qk

    @triton.jit
    def fwd_range(acc, m_i, l_i, q, K, V, lo, hi, kv_head, offs_m, offs_d, qk_scale, cap_pre, s_kt, s_kh,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                   SOFTCAP: tl.constexpr):
        """Online-softmax update of one query tile over keys ``[lo, hi)`` (base-2 logits)."""
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = load_rows(K, offs_n, kv_head, s_kt, s_kh, offs_d, hi, MASK)
            v = load_rows(V, offs_n, kv_head, s_kt, s_kh, offs_d, hi, MASK)
            s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap_pre, SOFTCAP)
            if MASK:
                ok = (offs_n < hi)[None, :]
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= offs_m[:, None])
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def dq_range(dq, q, do, lse, delta, K, V, lo, hi, kv_head, offs_m, offs_d, qk_scale, cap_pre, s_kt, s_kh,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                  SOFTCAP: tl.constexpr):
        """dQ of one query tile (in units of ``1/scale``) accumulated over keys ``[lo, hi)``."""
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = load_rows(K, offs_n, kv_head, s_kt, s_kh, offs_d, hi, MASK)
            v = load_rows(V, offs_n, kv_head, s_kt, s_kh, offs_d, hi, MASK)
            s, dcap = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap_pre, SOFTCAP)
            p = tl.exp2(s - lse[:, None])
            if MASK:
                ok = (offs_n < hi)[None, :]
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= offs_m[:, None])
                p = tl.where(ok, p, 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            if SOFTCAP:
                ds = ds * dcap
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        return dq

    @triton.jit
    def _dkdv_range(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, lo, hi, head, H, offs_d, qk_scale, cap_pre, s_qt, s_qh,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
                    SOFTCAP: tl.constexpr):
        """dK and dV (dK in units of ``1/scale``) of one key tile accumulated over the
        queries ``[lo, hi)`` of one head. A query past ``hi`` reads log-sum-exp +inf, so its
        probabilities are exactly zero."""
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = load_rows(Q, offs_m, head, s_qt, s_qh, offs_d, hi, MASK)
            do = load_rows(DO, offs_m, head, s_qt, s_qh, offs_d, hi, MASK)
            if MASK:
                m_ok = offs_m < hi
                lse = tl.load(LSE + offs_m * H + head, mask=m_ok, other=float("inf"))
                delta = tl.load(DELTA + offs_m * H + head, mask=m_ok, other=0.0)
            else:
                lse = tl.load(LSE + offs_m * H + head)
                delta = tl.load(DELTA + offs_m * H + head)
            s, dcap = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap_pre, SOFTCAP)
            p = tl.exp2(s - lse[:, None])
            if CAUSAL:
                p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            if SOFTCAP:
                ds = ds * dcap
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
        return dk, dv

    @triton.jit
    def fwd_visible(acc, m_i, l_i, q, K, V, lo, hi, kv_head, offs_m, offs_d, qk_scale, cap_pre, s_kt, s_kh,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
        """Keys ``[lo, hi)`` that every query of the tile sees: whole tiles unmasked, then
        the masked tail."""
        whole = lo + (hi - lo) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = fwd_range(acc, m_i, l_i, q, K, V, lo, whole, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                                   s_kt, s_kh, False, False, BLOCK_N, PREC, SOFTCAP)
        return fwd_range(acc, m_i, l_i, q, K, V, whole, hi, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                          s_kt, s_kh, True, False, BLOCK_N, PREC, SOFTCAP)

    @triton.jit
    def dq_visible(dq, q, do, lse, delta, K, V, lo, hi, kv_head, offs_m, offs_d, qk_scale, cap_pre, s_kt, s_kh,
                    BLOCK_N: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
        """:func:`dq_range` over keys every query of the tile sees (whole tiles, then the tail)."""
        whole = lo + (hi - lo) // BLOCK_N * BLOCK_N
        dq = dq_range(dq, q, do, lse, delta, K, V, lo, whole, kv_head, offs_m, offs_d, qk_scale, cap_pre, s_kt, s_kh,
                       False, False, BLOCK_N, PREC, SOFTCAP)
        return dq_range(dq, q, do, lse, delta, K, V, whole, hi, kv_head, offs_m, offs_d, qk_scale, cap_pre, s_kt, s_kh,
                         True, False, BLOCK_N, PREC, SOFTCAP)

    @triton.jit
    def _dkdv_visible(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, lo, hi, head, H, offs_d, qk_scale, cap_pre, s_qt, s_qh,
                      BLOCK_M: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
        """:func:`_dkdv_range` over queries that see every key of the tile (whole tiles, then the tail)."""
        whole = lo + (hi - lo) // BLOCK_M * BLOCK_M
        dk, dv = _dkdv_range(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, lo, whole, head, H, offs_d, qk_scale, cap_pre,
                             s_qt, s_qh, False, False, BLOCK_M, PREC, SOFTCAP)
        return _dkdv_range(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, whole, hi, head, H, offs_d, qk_scale, cap_pre,
                           s_qt, s_qh, True, False, BLOCK_M, PREC, SOFTCAP)

    @triton.jit
    def kernel_tile(BLOCKS, H, pid):
        """The tile and head of program ``pid`` (heads vary fastest)."""
        return BLOCKS + (pid // H) * 5, pid % H

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, BLOCKS, qk_scale, cap_pre, H, KV_GROUP,
                    s_qt, s_qh, s_kt, s_kh, s_ot, s_oh,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                    SOFTCAP: tl.constexpr):
        row, head = kernel_tile(BLOCKS, H, tl.program_id(0))
        kv_head = head // KV_GROUP
        q_start, q_end = tl.load(row + 0), tl.load(row + 1)
        p_start, p_end, own_start = tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
        offs_m = q_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = load_rows(Q, offs_m, head, s_qt, s_qh, offs_d, q_end, True)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        # keys every query of the tile sees: the row's prefix, then its own segment up to
        # the tile; then the diagonal, causally
        acc, m_i, l_i = fwd_visible(acc, m_i, l_i, q, K, V, p_start, p_end, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                                     s_kt, s_kh, BLOCK_N, PREC, SOFTCAP)
        acc, m_i, l_i = fwd_visible(acc, m_i, l_i, q, K, V, own_start, q_start, kv_head, offs_m, offs_d, qk_scale,
                                     cap_pre, s_kt, s_kh, BLOCK_N, PREC, SOFTCAP)
        acc, m_i, l_i = fwd_range(acc, m_i, l_i, q, K, V, q_start, q_end, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                                   s_kt, s_kh, True, True, BLOCK_N, PREC, SOFTCAP)
        m_ok = offs_m < q_end
        tl.store(O + offs_m[:, None] * s_ot + head * s_oh + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None])
        tl.store(LSE + offs_m * H + head, m_i + tl.log2(l_i), mask=m_ok)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, BLOCKS, qk_scale, cap_pre, scale, H, KV_GROUP,
                       s_qt, s_qh, s_kt, s_kh,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                       SOFTCAP: tl.constexpr):
        row, head = kernel_tile(BLOCKS, H, tl.program_id(0))
        kv_head = head // KV_GROUP
        q_start, q_end = tl.load(row + 0), tl.load(row + 1)
        p_start, p_end, own_start = tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
        offs_m = q_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < q_end
        q = load_rows(Q, offs_m, head, s_qt, s_qh, offs_d, q_end, True)
        do = load_rows(DO, offs_m, head, s_qt, s_qh, offs_d, q_end, True)
        o = load_rows(O, offs_m, head, s_qt, s_qh, offs_d, q_end, True)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + offs_m * H + head, delta, mask=m_ok)
        lse = tl.load(LSE + offs_m * H + head, mask=m_ok, other=float("inf"))
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        dq = dq_visible(dq, q, do, lse, delta, K, V, p_start, p_end, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                         s_kt, s_kh, BLOCK_N, PREC, SOFTCAP)
        dq = dq_visible(dq, q, do, lse, delta, K, V, own_start, q_start, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                         s_kt, s_kh, BLOCK_N, PREC, SOFTCAP)
        dq = dq_range(dq, q, do, lse, delta, K, V, q_start, q_end, kv_head, offs_m, offs_d, qk_scale, cap_pre,
                       s_kt, s_kh, True, True, BLOCK_N, PREC, SOFTCAP)
        tl.store(DQ + offs_m[:, None] * s_qt + head * s_qh + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=m_ok[:, None])

    @triton.jit
    def bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, BLOCKS, qk_scale, cap_pre, scale, H, HKV, KV_GROUP,
                         s_qt, s_qh, s_kt, s_kh,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                         SOFTCAP: tl.constexpr):
        row, kv_head = kernel_tile(BLOCKS, HKV, tl.program_id(0))
        k_start, k_end, own_end = tl.load(row + 0), tl.load(row + 1), tl.load(row + 2)
        x_start, x_end = tl.load(row + 3), tl.load(row + 4)
        offs_n = k_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k = load_rows(K, offs_n, kv_head, s_kt, s_kh, offs_d, k_end, True)
        v = load_rows(V, offs_n, kv_head, s_kt, s_kh, offs_d, k_end, True)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        # the queries of the key tile's own segment: the diagonal causally, then the later
        # ones, which see every key of the tile; for a prefix tile, every member query of
        # the row too (keys past k_end are never stored, so they need no mask)
        diag_end = tl.minimum(k_start + BLOCK_N, own_end)
        for g in range(0, KV_GROUP):  # every query head that shares this KV head
            head = kv_head * KV_GROUP + g
            dk, dv = _dkdv_range(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, k_start, diag_end, head, H, offs_d,
                                 qk_scale, cap_pre, s_qt, s_qh, True, True, BLOCK_M, PREC, SOFTCAP)
            dk, dv = _dkdv_visible(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, diag_end, own_end, head, H, offs_d,
                                   qk_scale, cap_pre, s_qt, s_qh, BLOCK_M, PREC, SOFTCAP)
            dk, dv = _dkdv_visible(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, x_start, x_end, head, H, offs_d,
                                   qk_scale, cap_pre, s_qt, s_qh, BLOCK_M, PREC, SOFTCAP)
        n_ok = offs_n < k_end
        tl.store(DK + offs_n[:, None] * s_kt + kv_head * s_kh + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=n_ok[:, None])
        tl.store(DV + offs_n[:, None] * s_kt + kv_head * s_kh + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=n_ok[:, None])


# ----------------------------------------------------------------------------- launches
def alloc(like: Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Uninitialised output buffers (tests replace this to poison them)."""
    return torch.empty(shape if shape is not None else like.shape, device=like.device, dtype=dtype or like.dtype)


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton shared-prefix kernel needs triton: pip install triton")


def _precision(dtype: torch.dtype) -> str | None:
    """float32 inputs get float32 products (not tf32); 16-bit inputs take Triton's default."""
    return "ieee" if dtype == torch.float32 else None


def score_scalars(scale: float, softcap: float | None) -> tuple[float, float, bool]:
    """``(qk_scale, cap_pre, SOFTCAP)`` of :func:`_scores`."""
    if softcap is None:
        return scale * LOG2E, 1.0, False
    return softcap * LOG2E, scale / softcap, True


def meta(q: Tensor, cfg: PassConfig, capped: bool) -> dict:
    """The compile-time arguments and launch shape shared by every pass."""
    return dict(D=q.shape[-1], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PREC=_precision(q.dtype), SOFTCAP=capped,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def launch_forward(q: Tensor, k: Tensor, v: Tensor, layout: tuple, row_starts: tuple, scale: float,
                   cfg: PassConfig, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """The forward pass alone: ``o`` ``[T, H, D]`` and the base-2 log-sum-exp ``[T, H]``
    (uncovered tokens are left as allocated)."""
    t, h, _ = q.shape
    o = alloc(q)
    lse = alloc(q, (t, h), torch.float32)
    qb = _query_blocks(layout, row_starts, cfg.block_m, q.device)
    qk_scale, cap_pre, capped = score_scalars(scale, softcap)
    if qb.shape[0]:
        _fwd_kernel[(qb.shape[0] * h,)](q, k, v, o, lse, qb, qk_scale, cap_pre, h, h // k.shape[1],
                                        q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
                                        **meta(q, cfg, capped))
    return o, lse


def launch_dq(q, k, v, o, do, lse, layout, row_starts, scale, cfg: PassConfig,
              softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """The dQ pass alone: ``dq`` ``[T, H, D]`` and ``delta`` ``[T, H]``."""
    t, h, _ = q.shape
    dq = alloc(q)
    delta = alloc(q, (t, h), torch.float32)
    qb = _query_blocks(layout, row_starts, cfg.block_m, q.device)
    qk_scale, cap_pre, capped = score_scalars(scale, softcap)
    if qb.shape[0]:
        _bwd_dq_kernel[(qb.shape[0] * h,)](q, k, v, o, do, lse, delta, dq, qb, qk_scale, cap_pre, scale, h, h // k.shape[1],
                                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), **meta(q, cfg, capped))
    return dq, delta


def launch_dkdv(q, k, v, do, lse, delta, layout, row_starts, scale, cfg: PassConfig,
                softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """The dK/dV pass alone (after :func:`launch_dq`, which writes ``delta``)."""
    h, hkv = q.shape[1], k.shape[1]
    dk, dv = alloc(k), alloc(v)
    kb = _key_blocks(layout, row_starts, cfg.block_n, q.device)
    qk_scale, cap_pre, capped = score_scalars(scale, softcap)
    if kb.shape[0]:
        bwd_dkdv_kernel[(kb.shape[0] * hkv,)](q, k, v, do, lse, delta, dk, dv, kb, qk_scale, cap_pre, scale, h, hkv,
                                               h // hkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                               **meta(q, cfg, capped))
    return dk, dv


def _zero_uncovered(layout, row_starts, *tensors: Tensor) -> None:
    idx = _uncovered(layout, row_starts, tensors[0].shape[0], tensors[0].device)
    if idx is not None:
        for x in tensors:
            x.index_fill_(0, idx, 0)


def dense(x: Tensor) -> Tensor:
    """The kernels index ``q``, ``o``, ``dO``, ``dQ`` with one set of strides (and ``k``,
    ``v``, ``dK``, ``dV`` with another): all contiguous. A ``[B, L, H, D]`` batch reshaped
    to ``[B*L, H, D]`` already is, so this copies nothing there."""
    return x.contiguous()


class _SharedPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, row_starts, scale, config, softcap):
        require_triton()
        q, k, v = dense(q), dense(k), dense(v)
        o, lse = launch_forward(q, k, v, layout, row_starts, scale, config.fwd, softcap)
        _zero_uncovered(layout, row_starts, o)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.row_starts, ctx.scale, ctx.config, ctx.softcap = layout, row_starts, scale, config, softcap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, delta = launch_dq(q, k, v, o, do, lse, ctx.layout, ctx.row_starts, ctx.scale, ctx.config.dq, ctx.softcap)
        dk, dv = launch_dkdv(q, k, v, do, lse, delta, ctx.layout, ctx.row_starts, ctx.scale, ctx.config.dkdv, ctx.softcap)
        _zero_uncovered(ctx.layout, ctx.row_starts, dq, dk, dv)
        return dq, dk, dv, None, None, None, None, None


def check_shapes(q: Tensor, k: Tensor, v: Tensor, value_dim_may_differ: bool = False) -> None:
    """``q`` ``[T, H, D]``, ``k`` ``[T, Hkv, D]``, ``v`` ``[T, Hkv, Dv]`` with ``H`` a multiple of
    ``Hkv`` and ``Dv = D`` (other value widths, multi-head latent attention's, only where
    ``value_dim_may_differ``: the PyTorch references)."""
    same_v = k.shape[:2] == v.shape[:2] and (value_dim_may_differ or k.shape == v.shape)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or not same_v or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, H, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")


def _check(q: Tensor, k: Tensor, v: Tensor, layout, row_starts=None) -> None:
    check_shapes(q, k, v)
    if q.numel() >= 2**31:
        raise ValueError(f"q has {q.numel()} elements; the kernel indexes with 32-bit offsets (at most 2**31 - 1): "
                         "split the micro-batch")
    if row_starts is None:
        total = sum(row.length for row in layout)
        if total > q.shape[0]:
            raise ValueError(f"the layout covers {total} tokens but q has {q.shape[0]}")
        return
    if len(row_starts) != len(layout):
        raise ValueError(f"{len(row_starts)} row starts for {len(layout)} layout rows")
    end = 0
    for i, (row, start) in enumerate(zip(layout, row_starts)):
        if start < end:
            raise ValueError(f"row {i} starts at token {start}, inside the previous row (which ends at {end})")
        end = start + row.length
    if end > q.shape[0]:
        raise ValueError(f"the last row ends at token {end} but q has {q.shape[0]}")


def kernel_config(head_dim: int, softcap: float | None, config: KernelConfig | None = None,
                  block_m: int | None = None, block_n: int | None = None) -> KernelConfig:
    """The tile shapes of a launch (``config``; else one shape for every pass from
    ``block_m``/``block_n``, tests; else :func:`config_for` the head dimension), after
    refusing what the kernels cannot run: a head dimension that is not a power of two
    >= 16, a soft-cap that is not positive."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise NotImplementedError(f"head dim {head_dim}: the Triton kernel needs a power of two >= 16 (its tiles are "
                                  "tl.arange(0, D)); use trainer.attention=sdpa_shared_prefix for this model")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if config is None:
        config = config_for(head_dim)
        if block_m is not None or block_n is not None:
            config = KernelConfig.uniform(block_m or config.fwd.block_m, block_n or config.fwd.block_n)
    return config


def shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: Sequence, scale: float | None = None,
                            block_m: int | None = None, block_n: int | None = None,
                            row_starts: Sequence[int] | None = None, config: KernelConfig | None = None,
                            softcap: float | None = None) -> Tensor:
    """Packed shared-prefix attention with the Triton kernel (differentiable).

    Args:
        q: ``[T, H, D]``; k, v: ``[T, Hkv, D]`` (any token and head strides).
        layout: ``RowLayout`` per packed row.
        scale: softmax scale (default ``D ** -0.5``).
        block_m, block_n: one tile shape for every pass (tests); by default each pass
            uses its tuned :class:`PassConfig` for the head dimension (``config`` to set them).
        row_starts: the first token of each row (default: back to back from token 0).
        softcap: attention logit soft-cap ``cap * tanh(scores / cap)`` (Gemma2), or ``None``.

    Returns:
        ``[T, H, D]``; tokens outside every row are zero (and get zero gradients).
    """
    _check(q, k, v, layout, row_starts)
    config = kernel_config(q.shape[2], softcap, config, block_m, block_n)
    layout = tuple(layout)
    return _SharedPrefixAttention.apply(q, k, v, layout, _row_starts(layout, row_starts),
                                        scale if scale is not None else q.shape[-1] ** -0.5, config, softcap)


def shared_prefix_attention_reference(q: Tensor, k: Tensor, v: Tensor, layout: Sequence,
                                      scale: float | None = None, row_starts: Sequence[int] | None = None,
                                      softcap: float | None = None) -> Tensor:
    """The same function in PyTorch: per segment, attention over the prefix keys and the
    segment's own keys (``[T, H, D]`` in and out; tokens outside every row are zero)."""
    _check(q, k, v, layout, row_starts)
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    index, pieces = [], []
    for row_start, p, seg_start, n, is_prefix, _ in _segments(layout, row_starts):
        qs = q[seg_start:seg_start + n].transpose(0, 1)  # [H, n, D]
        keys = torch.arange(seg_start, seg_start + n) if is_prefix else torch.cat(
            [torch.arange(row_start, row_start + p), torch.arange(seg_start, seg_start + n)])
        keys = keys.to(q.device)
        ks, vs = k[keys].transpose(0, 1), v[keys].transpose(0, 1)
        offset = 0 if is_prefix else p
        allowed = torch.arange(len(keys), device=q.device)[None, :] <= (torch.arange(n, device=q.device)[:, None] + offset)
        index.append(torch.arange(seg_start, seg_start + n, device=q.device))
        pieces.append(masked_attention(qs, ks, vs, allowed, scale, softcap).transpose(0, 1))
    if not pieces:
        return torch.zeros_like(q)
    return torch.zeros_like(q).index_copy(0, torch.cat(index), torch.cat(pieces))
