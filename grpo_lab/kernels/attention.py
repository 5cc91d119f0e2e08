"""Attention in PyTorch, the primitive every reference path here is written with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def repeat_kv(x: Tensor, times: int, dim: int = 1) -> Tensor:
    """Grouped-query keys or values repeated ``times`` along the head ``dim``."""
    return x if times == 1 else x.repeat_interleave(times, dim=dim)


def masked_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float | None = None,
                     softcap: float | None = None) -> Tensor:
    """``softmax(cap(q k^T * scale) + mask) v`` for ``[..., Q, D]`` queries and ``[..., K, D]``
    keys (same head count); ``mask`` bool (True: attend), broadcastable to ``[..., Q, K]``,
    or ``None`` for causal. Without ``softcap`` it is SDPA; with one, scores become
    ``softcap * tanh(scores / softcap)`` before masking (Gemma2), in float32 at least."""
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    compute = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query.to(compute), key.to(compute).transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        q, k = scores.shape[-2:]
        mask = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # as eager attention: no NaN on empty rows
    return torch.matmul(torch.softmax(scores, dim=-1), value.to(compute)).to(query.dtype)
