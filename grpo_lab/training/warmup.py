"""Supervised warm-up on format-only demonstrations.

A randomly initialised model cannot write ``<action>...</action>``. Before RL, the
default run imitates demonstrations that the environment generates by playing *random
legal actions* in the right format: they teach the answer format and the legal moves,
never a good policy, so any rise in success afterwards comes from RL.
"""

from __future__ import annotations

import logging
import random
from typing import Callable

import torch
from torch import Tensor

from .forward import response_logprobs

log = logging.getLogger("grpo_lab")


def supervised_warmup(
    model: torch.nn.Module,
    examples: list[tuple[Tensor, Tensor]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Minimise the answer tokens' negative log-likelihood for ``steps`` steps of AdamW on
    random mini-batches; returns the loss of each step."""
    if not examples:
        raise ValueError("no demonstrations to warm up on")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        logprobs, mask, _ = response_logprobs(model, [p for p, _ in batch], [a for _, a in batch], pad_id=pad_id)
        loss = -(logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
