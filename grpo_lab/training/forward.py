"""The training forward: per-token log-probs of responses given their prompts."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def pad_rows(rows: Sequence[Tensor], value: float | int, dtype: torch.dtype | None = None) -> Tensor:
    """Right-pad one-dimensional tensors into ``[B, max_len]``."""
    width = max((r.numel() for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype or rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Tensor],
    response_ids: Sequence[Tensor],
    temperature: float = 1.0,
    with_entropy: bool = False,
    pad_id: int = 0,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Log-probs of each response token under ``model``, one row per (prompt, response).

    Rows are packed as ``[prompt; response]`` and right-padded, so positions start at 0
    in every row and no token attends to padding.

    Args:
        prompt_ids: ``B`` tensors ``[P_i]``; response_ids: ``B`` tensors ``[R_i]``.
        temperature: logits are divided by it (as the sampler did).

    Returns:
        ``logprobs`` ``[B, R]`` (``R = max R_i``, zero past each row's end), ``mask``
        ``[B, R]`` (1 on real response tokens) and, if asked, ``entropy`` ``[B, R]`` of
        the temperature-scaled next-token distribution (detached unless ``entropy_grad``:
        an entropy bonus needs its gradient, which keeps a ``[B, R, V]`` tensor for the
        backward).
    """
    device = next(model.parameters()).device
    seqs = [torch.cat([p, r]) for p, r in zip(prompt_ids, response_ids)]  # B x [P_i + R_i]
    input_ids = pad_rows(seqs, pad_id, torch.long).to(device)  # [B, L]
    lengths = torch.tensor([s.numel() for s in seqs], device=device)  # [B]
    attention = (torch.arange(input_ids.shape[1], device=device)[None, :] < lengths[:, None]).long()  # [B, L]
    logits = model(input_ids=input_ids, attention_mask=attention).logits  # [B, L, V]

    p_len = torch.tensor([p.numel() for p in prompt_ids], device=device)  # [B]
    r_len = torch.tensor([r.numel() for r in response_ids], device=device)  # [B]
    width = int(r_len.max()) if len(response_ids) else 0
    offsets = torch.arange(width, device=device)[None, :]  # [1, R]
    mask = offsets < r_len[:, None]  # [B, R]
    # the logit at position t predicts token t + 1: response token j sits at P + j
    positions = (p_len[:, None] - 1 + offsets).clamp(max=input_ids.shape[1] - 1)  # [B, R]
    picked = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # [B, R, V]
    targets = pad_rows(list(response_ids), pad_id, torch.long).to(device)  # [B, R]
    logprobs, entropy = token_logprobs(picked, targets, temperature, with_entropy, entropy_grad)  # [B, R] each
    return logprobs * mask, mask.float(), entropy * mask if with_entropy else None  # [B, R] each


def token_logprobs(picked: Tensor, targets: Tensor, temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``targets`` ``[N, R]`` from the logits ``[N, R, V]`` that predict them,
    temperature-scaled in float32 at least (bf16/fp16 logits are upcast), and, if asked,
    the entropy ``[N, R]`` of each distribution (see :func:`response_logprobs`). Every
    forward (plain, shared-prefix, trie) ends here."""
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32)) / temperature  # [N, R, V]
    logp_all = torch.log_softmax(picked, dim=-1)  # [N, R, V]
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, R]
    return logprobs, token_entropy(logp_all, entropy_grad) if with_entropy else None


def token_entropy(logp_all: Tensor, with_grad: bool = False) -> Tensor:
    """``[..., V]`` log-probs to the entropy ``[...]`` of each distribution."""
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        return -(logp_all.exp() * logp_all).sum(-1)
