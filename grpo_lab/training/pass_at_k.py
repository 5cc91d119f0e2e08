"""pass@k of an evaluation that samples several episodes per task.

pass@k is the probability that at least one of k episodes sampled for a task succeeds,
averaged over tasks. With n >= k episodes per task of which c succeeded, the unbiased
estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code",
eq. 1) is ``1 - C(n - c, k) / C(n, k)``; it uses all n samples, so its variance is
lower than that of drawing k of them once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pass_at_k(samples: Tensor, correct: Tensor, k: int) -> Tensor:
    """``[S]`` unbiased pass@k of each task.

    Args:
        samples: ``[S]`` episodes played per task (n), each ``>= k``.
        correct: ``[S]`` how many of them succeeded (c).
        k: episodes per attempt, ``>= 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, c = samples.to(torch.float64), correct.to(torch.float64)
    if bool((n < k).any()):
        raise ValueError(f"pass@{k} needs at least {k} episodes per task; got {int(n.min())}")
    if bool(((c < 0) | (c > n)).any()):
        raise ValueError("correct must lie between 0 and the number of episodes of its task")
    fail = n - c
    # log C(n - c, k) - log C(n, k), grouped so that it is exactly 0 when c = 0;
    # every draw of k holds a success when n - c < k
    log_ratio = ((torch.lgamma(fail + 1) - torch.lgamma(n + 1))
                 + (torch.lgamma(n - k + 1) - torch.lgamma((fail - k).clamp(min=0) + 1)))
    return torch.where(fail < k, torch.ones_like(n), -torch.expm1(log_ratio))


def pass_at_k_ks(n: int) -> list[int]:
    """The k reported for ``n`` episodes per task: 1, 2, 4, ... up to ``n``, and ``n``."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def success_counts(task: Tensor, won: Tensor) -> tuple[Tensor, Tensor]:
    """Episodes and successes per task.

    Args:
        task: ``[E]`` the task (any integer id) of each episode.
        won: ``[E]`` bool, whether each episode succeeded.

    Returns:
        ``samples`` and ``correct``, ``[S]`` each, in the order of the sorted task ids.
    """
    _, inverse, samples = torch.unique(task, return_inverse=True, return_counts=True)
    correct = torch.zeros(samples.numel(), dtype=torch.long).index_add_(0, inverse, won.long())
    return samples, correct
