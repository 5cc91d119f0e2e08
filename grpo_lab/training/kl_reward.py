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
The penalty goes to ``RolloutBatch.reward_shaping`` (the reward the estimator sees);
``reward`` stays the environment's, so the step's ``reward_mean`` is comparable across
runs (verl's ``score`` against its ``rewards``). Baseline episodes (ReMax's greedy ones)
pay nothing and are not measured: their return is the plain score, as verl's
``reward_baselines``.
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
        """``batch`` with beta times each row's KL sum taken off its ``reward_shaping``,
        and the metrics; ``policy`` and ``reference``: the log-probs ``[R_i]`` of the rows
        that are not baseline episodes, in order. Every rank calls it (the controller's
        measurement is reduced over ranks)."""
        beta = float(self.controller.value)
        rows = torch.nonzero(~batch.baseline_only).flatten()  # [M] the rows that pay
        sums, means = row_kl_sums(policy, reference, [batch.loss_mask[i] for i in rows.tolist()],
                                  self.estimator)  # [M] each
        total, count = dp.global_sums(dist, [float(means.sum()), float(rows.numel())])
        kl = total / max(count, 1.0)
        penalty = torch.zeros(len(batch), dtype=torch.float32).index_add_(0, rows, beta * sums.float())  # [N]
        penalised = batch if not len(batch) else replace(batch, reward_shaping=batch.reward_shaping - penalty)
        self.controller.observe(kl, int(count))
        return penalised, {"kl_reward_coef": beta, "kl_reward": kl,
                           "kl_reward_penalty": float(beta * sums.mean()) if rows.numel() else 0.0}

    def penalise(self, batch: RolloutBatch, update: PolicyUpdate) -> tuple[RolloutBatch, dict[str, float]]:
        """:meth:`__call__` with the log-probs of the policy before its update and of
        ``update.ref_model``, through the update's packing (on every rank), for the rows
        that are not baseline episodes."""
        paying = batch.select(torch.nonzero(~batch.baseline_only).flatten()) if len(batch) else batch
        policy = update.logprobs_no_grad(paying)
        reference = update.logprobs_no_grad(paying, update.ref_model)
        return self(batch, policy, reference, update.dist)
