"""KL to the reference in the reward, in place of (or besides) a KL term in the loss.

As verl's ``algorithm.use_kl_in_reward`` (after Ziegler et al. 2019 and InstructGPT):
each row's reward loses ``beta`` times the KL estimate summed over its sampled tokens,

    r_i <- r_i - beta * sum_t k(log pi_old(o_t) - log pi_ref(o_t)),

before the advantages are computed, so the penalty is part of the return that the
estimator compares within a group; ``k`` is an estimator of
:data:`~grpo_lab.losses.KL_ESTIMATORS` (verl's default here is ``k1``, the plain
log-ratio). ``beta`` is fixed or adaptive (:mod:`~grpo_lab.training.coefficients`); the
adaptive controller observes the batch's mean over rows of each row's token-mean KL,
reduced over ranks. ``pi_old`` is the policy before the step's update, computed by the
trainer's forward (not the sampler's log-probs), as verl's ``old_log_prob``.
Departure, stated: on multi-turn episodes each turn's row pays for its own tokens in its
own step reward (verl has one response per episode).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from ..data import RolloutBatch
from . import distributed as dp
from .update import PolicyUpdate


def row_kl_sums(policy: list[Tensor], reference: list[Tensor], masks: list[Tensor],
                estimator: Callable[[Tensor, float], Tensor], clamp: float = 10.0) -> tuple[Tensor, Tensor]:
    """Each row's KL estimate summed over its ``mask`` tokens ``[N]``, and its mean over
    them ``[N]`` (0 for a row without tokens); ``N`` tensors ``[R_i]`` each."""
    sums, means = [], []
    for lp, ref, mask in zip(policy, reference, masks):
        kl = estimator((lp - ref).double(), clamp) * mask.double()  # [R_i]
        sums.append(kl.sum())
        means.append(kl.sum() / mask.sum().clamp(min=1))
    if not sums:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.stack(sums), torch.stack(means)  # [N] each


@dataclass
class KLInReward:
    """The reward's KL penalty of a run: ``controller`` holds beta (``value``,
    ``observe(kl, rows)``), ``estimator`` the per-token estimate."""

    controller: Any
    estimator: Callable[[Tensor, float], Tensor]

    def __call__(self, batch: RolloutBatch, policy: list[Tensor], reference: list[Tensor],
                 dist: dp.DistContext = dp.SINGLE) -> tuple[RolloutBatch, dict[str, float]]:
        """``batch`` with every row's reward less beta times its KL sum, and the metrics;
        ``policy`` and ``reference``: ``N`` log-prob tensors ``[R_i]``. Every rank calls it
        (the controller's measurement is reduced over ranks)."""
        beta = float(self.controller.value)
        sums, means = row_kl_sums(policy, reference, batch.loss_mask, self.estimator)  # [N] each
        total, rows = dp.global_sums(dist, [float(means.sum()), float(len(batch))])
        kl = total / max(rows, 1.0)
        penalised = batch if not len(batch) else replace(batch, reward=batch.reward - beta * sums.float())
        self.controller.observe(kl, int(rows))
        return penalised, {"kl_reward_coef": beta, "kl_reward": kl,
                           "kl_reward_penalty": float(beta * sums.mean()) if len(batch) else 0.0}

    def penalise(self, batch: RolloutBatch, update: PolicyUpdate) -> tuple[RolloutBatch, dict[str, float]]:
        """:meth:`__call__` with the log-probs of the policy before its update and of
        ``update.ref_model``, through the update's packing (on every rank)."""
        policy = update.logprobs_no_grad(batch)
        reference = update.logprobs_no_grad(batch, update.ref_model)
        return self(batch, policy, reference, update.dist)
