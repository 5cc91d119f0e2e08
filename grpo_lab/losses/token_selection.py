"""Token selection: train the policy loss on the high-entropy "forking" tokens only.

Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
Reinforcement Learning for LLM Reasoning" (arXiv:2506.01939), as TRL's
``top_entropy_quantile`` (rho) computes it: the threshold is the ``1 - rho`` quantile
(linear interpolation, ``torch.quantile``) of the entropies of the trained tokens, and a
token is kept when its entropy is at least the threshold (``rho = 0.2``, the paper's,
keeps the top 20%; ``rho = 1`` keeps all). The policy loss and the entropy bonus see the
kept tokens only; the KL term sees every token.

The selection multiplies each policy loss's per-token term after the loss has taken its
row statistics (a sequence ratio, VESPO's weight, Clip-Cov's covariance) over every
token, and the normalisers stay those of every token, as TRL's ``entropy_mask``.
Departure, stated: the quantile is over one micro-batch's tokens on this process (TRL
gathers the micro-batch's tokens of every process).
"""

from __future__ import annotations

import torch
from torch import Tensor


def high_entropy_keep(entropy: Tensor, mask: Tensor, quantile: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``[B, T]`` 1 on the tokens of ``mask`` whose entropy is at least the ``1 - quantile``
    quantile of the masked tokens' entropies (0 everywhere without a token), and
    ``entropy_threshold``.

    Args:
        entropy: ``[B, T]`` per-token entropy (detached here); mask: ``[B, T]``.
        quantile: rho in [0, 1], the share of tokens kept.
    """
    if not 0 <= quantile <= 1:
        raise ValueError(f"the top-entropy quantile must be in [0, 1], got {quantile}")
    valid = mask.bool()  # [B, T]
    values = entropy.detach().float()[valid]  # [n]
    if values.numel() == 0:
        return torch.zeros_like(mask), {}
    threshold = torch.quantile(values, 1.0 - quantile)  # []
    keep = (entropy.detach().float() >= threshold) & valid  # [B, T]
    return keep.to(mask.dtype), {"entropy_threshold": threshold}
