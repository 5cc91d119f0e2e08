"""Attention over packed sequences, by layout and backend: the PyTorch reference (exact
everywhere, the plain version the kernels are tested against) or the Triton kernels.

``packed_attention`` is what the attention registered in ``transformers``
(:mod:`grpo_lab.training.shared_prefix`) calls once a layout is present.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .attention import masked_attention, repeat_kv
from .layouts import RowLayout, TrieLayout
from .shared_prefix_attention import shared_prefix_attention as row_kernel
from .trie_attention import trie_attention as trie_kernel
from .trie_attention import trie_attention_reference

#: the packed attention's backends (``trainer.attention``: ``sdpa_shared_prefix`` is the
#: reference, ``triton_shared_prefix`` the kernels)
BACKENDS = ("reference", "triton")


def packed_attention(query: Tensor, key: Tensor, value: Tensor, layout: "TrieLayout | Sequence[RowLayout]",
                     backend: str, scaling: float | None, softcap: float | None, window: int | None = None,
                     chunk: int | None = None) -> Tensor:
    """Attention of a packed batch: ``[B, H, L, D]`` queries, ``[B, Hkv, L, D]`` keys and
    values in, ``[B, L, H, D]`` out. ``layout``: a :class:`TrieLayout` (``B`` = 1) or one
    :class:`RowLayout` per row; ``window`` and ``chunk`` apply by depth in the trie's
    reference only."""
    if isinstance(layout, TrieLayout):
        return _trie(query, key, value, layout, backend, scaling, softcap, window, chunk)
    if backend == "reference":
        return packed_attention_reference(query, key, value, layout, scaling, softcap).transpose(1, 2).contiguous()
    if backend == "triton":
        return _rows_triton(query, key, value, layout, scaling, softcap)
    raise ValueError(f"unknown packed attention backend {backend!r}; valid: {list(BACKENDS)}")


def packed_attention_reference(query: Tensor, key: Tensor, value: Tensor, layout: Sequence[RowLayout],
                               scaling: float | None = None, softcap: float | None = None) -> Tensor:
    """Attention of packed rows, in PyTorch.

    Args:
        query: ``[B, H, L, D]``; key, value: ``[B, Hkv, L, D]`` (``H`` a multiple of ``Hkv``).
        layout: one :class:`RowLayout` per row (``L`` >= its length; the rest is padding).
        softcap: attention logit soft-cap (Gemma2), or ``None``.

    Returns:
        ``[B, H, L, D]``; padding positions are zero.
    """
    b, h, length, d = query.shape
    key = repeat_kv(key, h // key.shape[1])
    value = repeat_kv(value, h // value.shape[1])
    rows = []
    for i, row in enumerate(layout):
        p, lens = row.prefix_len, row.member_lens
        pieces = []
        if p > 0:
            pieces.append(masked_attention(query[i, :, :p], key[i, :, :p], value[i, :, :p], None, scaling, softcap))
        if lens:
            g, r_max = len(lens), max(lens)
            starts = torch.tensor([p + sum(lens[:k]) for k in range(g)], device=query.device)
            offsets = torch.arange(r_max, device=query.device)
            valid = offsets[None, :] < torch.tensor(lens, device=query.device)[:, None]  # [G, Rmax]
            index = (starts[:, None] + offsets[None, :]).clamp(max=length - 1)  # [G, Rmax]
            q_m = query[i][:, index].transpose(0, 1)  # [G, H, Rmax, D]
            k_m = key[i][:, index].transpose(0, 1)
            v_m = value[i][:, index].transpose(0, 1)
            k_all = torch.cat([key[i, :, :p].unsqueeze(0).expand(g, -1, -1, -1), k_m], dim=2)
            v_all = torch.cat([value[i, :, :p].unsqueeze(0).expand(g, -1, -1, -1), v_m], dim=2)
            causal = offsets[None, :, None] >= offsets[None, None, :]  # [1, Rmax, Rmax]
            own = causal & valid[:, None, :]  # [G, Rmax, Rmax]
            prefix = torch.ones(g, r_max, p, dtype=torch.bool, device=query.device)
            mask = torch.cat([prefix, own], dim=2).unsqueeze(1)  # [G, 1, Rmax, P + Rmax]
            out = masked_attention(q_m, k_all, v_all, mask, scaling, softcap)
            pieces.extend(out[k, :, : lens[k]] for k in range(g))
        if length > row.length:
            pieces.append(query.new_zeros(h, length - row.length, value.shape[-1]))
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows)


def _rows_triton(query: Tensor, key: Tensor, value: Tensor, layout: Sequence[RowLayout],
                             scaling: float | None, softcap: float | None = None) -> Tensor:
    """The Triton kernel on padded rows: ``[B, H, L, D]`` in, ``[B, L, H, D]`` out.

    The batch goes in as ``[B*L, H, D]`` with row ``b`` starting at token ``b*L``: the
    models' projections already lay queries out as ``[B, L, H, D]``, so this is a view,
    and the padding between rows gets zero output and zero gradients."""
    b, _, length, _ = query.shape
    flat = [x.transpose(1, 2).reshape(b * length, x.shape[1], x.shape[3]) for x in (query, key, value)]
    out = row_kernel(*flat, layout, scale=scaling, row_starts=[i * length for i in range(b)], softcap=softcap)
    return out.view(b, length, *out.shape[1:])


def _trie(query: Tensor, key: Tensor, value: Tensor, layout: TrieLayout, backend: str,
                   scaling: float | None, softcap: float | None, window: int | None = None,
                   chunk: int | None = None) -> Tensor:
    """The packed trie's attention inside a model: ``[1, H, L, D]`` queries, ``[1, Hkv, L,
    D]`` keys and values in, ``[1, L, H, D]`` out. ``window`` and ``chunk`` (a sliding
    window, chunked attention) apply by depth in the PyTorch reference; the kernel takes
    neither."""
    if query.shape[0] != 1:
        raise ValueError(f"a packed trie is one row; got a batch of {query.shape[0]}")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [L, H, D]
    if backend == "reference":
        out = trie_attention_reference(q, k, v, layout, scaling, softcap, window, chunk)
    elif backend == "triton":
        out = trie_kernel(q, k, v, layout, scaling, softcap=softcap)
    else:
        raise ValueError(f"unknown trie attention backend {backend!r}")
    return out[None]
