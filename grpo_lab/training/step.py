"""One optimizer step's gradient: micro-batched, with a loss scale independent of the split."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import Tensor

from ..advantages.grouping import dense_ids
from ..data import RolloutBatch
from .distributed import SINGLE, DistContext, global_sums, gradient_sync, lockstep_count
from .forward import pad_rows
from .packing import Packing, get_packing
from .shared_prefix import common_prefix_length
from ..losses import (LossScale, Objective, aggregate, behaviour_weights, bias_corrected_kl, high_entropy_keep, kl_penalty,
                      off_policy_sequence_keep, rejection_keep)


def split_micro_batches(batch: RolloutBatch, rows: Tensor, max_rows: int, max_tokens: int | None = None,
                        packing: "str | Packing" = "none") -> list[Tensor]:
    """``rows`` (in order) cut into micro-batches of at most ``max_rows`` rows and, when
    ``max_tokens`` is set, at most that many tokens encoded (a row longer than the budget
    goes alone). Under a packing that sorts rows (``trie``, ``auto``, ``group``) a row
    costs the tokens it does not share with the row before it (what the trie adds for it,
    at most; ``auto`` falls back to the plain forward only where that costs about as
    much); otherwise its prompt and response.

    Args:
        rows: ``[M]`` row indices of ``batch``.

    Returns:
        the micro-batches, ``[m_k]`` index tensors that concatenate to ``rows``.
    """
    if rows.numel() == 0:
        return []
    if max_tokens is None:
        return list(rows.split(max_rows))
    shares = get_packing(packing).shares_prefixes
    micros, current, used, prev = [], [], 0, None
    for i in rows.tolist():
        seq = torch.cat([batch.prompt_ids[i], batch.response_ids[i]])  # [P_i + R_i]
        shared = common_prefix_length([seq, prev]) if shares and prev is not None else 0
        if current and (len(current) >= max_rows or used + seq.numel() - shared > max_tokens):
            micros.append(torch.tensor(current))
            current, used, shared = [], 0, 0  # a new micro-batch shares nothing yet
        current.append(i)
        used += seq.numel() - shared
        prev = seq
    micros.append(torch.tensor(current))
    return micros


def micro_groups(batch: RolloutBatch, idx: list[int]) -> list[list[int]]:
    """The positions in ``idx`` (a micro-batch's rows) of each group, in order of first
    appearance (what the ``group`` packing packs together)."""
    groups: dict[int, list[int]] = {}
    for k, i in enumerate(idx):
        groups.setdefault(int(batch.group_id[i]), []).append(k)
    return list(groups.values())


def signal_mask(advantages: Tensor, extras: dict[str, Tensor] | None = None) -> Tensor:
    """``[N]`` bool: the rows whose policy-loss gradient can be non-zero: a non-zero
    advantage, or COPO's global stream where it has weight (``extras``).

    Args:
        advantages: ``[N]``.
    """
    signal = advantages != 0  # [N]
    if extras and "global_advantages" in extras:
        signal = signal | ((extras["global_advantages"] != 0) & (extras["local_weight"] < 1))  # [N]
    return signal


def without_baseline_rows(batch: RolloutBatch, advantages: Tensor, extras: dict[str, Tensor]
                          ) -> tuple[RolloutBatch, Tensor, dict[str, Tensor]]:
    """The batch, advantages ``[N]`` and streams without the rows of baseline episodes
    (``batch.baseline_only``, ReMax's greedy episodes): they scored, they do not train."""
    if not bool(batch.baseline_only.any()):
        return batch, advantages, extras
    keep = torch.nonzero(~batch.baseline_only).flatten()  # [N'] row indices
    return batch.select(keep), advantages[keep], {key: value[keep] for key, value in extras.items()}


def informative_rows(group_id: Tensor, advantages: Tensor) -> Tensor:
    """Indices of the rows of groups with at least one non-zero advantage (DAPO's dynamic
    sampling keeps only these groups). The estimator's output decides, so GiGPO's step
    advantages and a tree's shared path count as signal even where returns are equal.

    Args:
        group_id: ``[N]``; advantages: ``[N]`` or ``[N, T]``.
    """
    signal = advantages != 0  # [N] or [N, T]
    if signal.dim() > 1:
        signal = signal.flatten(1).any(1)  # [N]
    group, k = dense_ids(group_id)  # [N] in 0..k-1
    alive = torch.zeros(k, dtype=torch.long).index_add_(0, group, signal.long()) > 0  # [k] groups with a signal
    return torch.nonzero(alive[group]).flatten()


class RunningMeans:
    """Weighted means of named scalars."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value * weight
        self._weights[name] = self._weights.get(name, 0.0) + weight

    def count(self, name: str) -> int:
        return int(self._weights.get(name, 0))

    def weighted(self) -> dict[str, tuple[float, float]]:
        """``{name: (mean, total weight)}``."""
        return {k: (self._sums[k] / self._weights[k], self._weights[k]) for k in self._sums if self._weights[k] > 0}

    def means(self) -> dict[str, float]:
        return {k: self._sums[k] / self._weights[k] for k in self._sums if self._weights[k] > 0}


def policy_gradient_backward(
    model: torch.nn.Module,
    batch: RolloutBatch,
    rows: Tensor,
    advantages: Tensor,
    old_logprobs: list[Tensor] | None,
    objective: Objective,
    *,
    micro_batch_size: int,
    max_tokens: float,
    micro_batch_tokens: int | None = None,
    extras: dict[str, Tensor] | None = None,
    ref_model: torch.nn.Module | None = None,
    packing: "bool | str | Packing" = "none",
    attention: str = "reference",
    temperature: float = 1.0,
    pad_id: int = 0,
    dist: DistContext = SINGLE,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, tuple[float, float]]:
    """Accumulate into ``.grad`` the gradient of the policy loss of mini-batch ``rows``.

    Under data parallelism (``dist``; ``model`` is then the DDP or FSDP module) the
    mini-batch is the union of every rank's ``rows``: the normalisers are summed over
    ranks, each rank's loss is multiplied by the world size (DDP and FSDP average the
    gradients), every rank runs the same number of micro-batches (a rank with fewer runs
    gradient-free passes), and gradients are reduced in the last one only.

    The loss (``objective``'s policy loss and aggregation, plus its ``kl_coef`` times the
    KL penalty to ``ref_model``, minus its ``entropy_coef`` times the entropy) of every micro-batch is normalised by the
    counts of the whole mini-batch, so the accumulated gradient does not depend on
    ``micro_batch_size``. Without a KL or entropy term, rows with zero advantage are
    skipped (their loss and gradient are exactly zero) but counted. Rows with
    ``batch.off_policy`` are weighed by ``min(pi_old / pi_behaviour,
    objective.off_policy_is_cap)`` (:func:`~grpo_lab.losses.behaviour_weights`).

    Args:
        rows: ``[M]`` row indices of the mini-batch.
        micro_batch_size, micro_batch_tokens: the most rows, and tokens encoded, of one
            micro-batch (:func:`split_micro_batches`).
        advantages: ``[N]`` one per row of ``batch``.
        old_logprobs: ``N`` tensors ``[R_i]`` from the policy that sampled, or ``None`` for a
            strictly on-policy single pass (the current log-probs, detached).
        extras: ``[N]`` streams from the estimator (``global_advantages`` and
            ``local_weight`` for COPO's blended loss).
        objective: the loss, every name resolved (``AlgoConfig.objective()``).
        ref_model: the frozen reference; required when ``objective.kl_coef > 0``.
        packing: the training forward, a :class:`~grpo_lab.training.packing.Packing`
            (or, for a caller of its own, its name in :data:`~grpo_lab.training.packing.PACKINGS`;
            ``True`` is ``"group"``), for the policy and the KL reference alike. Under a packing
            that shares prefixes, rows are ordered by group, trajectory and step before
            the micro-batch split, so that rows sharing prefixes meet (the order does not
            change the gradient); the models must have gone through ``enable_shared_prefix``.
        attention: the packed attention: ``"reference"`` or ``"triton"``.
        autocast: a context for each forward (mixed precision).

    Returns:
        ``{name: (value, weight)}`` for logging (token-weighted means; ``loss`` is this
        rank's share of the mini-batch loss, weight 1, and the ranks' shares add up to
        it); empty when no row of any rank carries a learning signal (then no rank
        accumulated a gradient), so every rank sees the same emptiness.
    """
    if objective.kl_coef > 0 and ref_model is None:
        raise ValueError(f"algo.kl_coef={objective.kl_coef} needs a reference model")
    extras = extras or {}
    if extras and not objective.policy_loss.streams:
        raise ValueError(f"the estimator's extra streams {sorted(extras)} need a policy loss that reads them "
                         f"(algo.policy_loss={objective.policy_loss.name} does not)")
    masks = batch.loss_mask
    num_tokens, num_seqs = global_sums(dist, [sum(float(masks[i].sum()) for i in rows.tolist()), float(rows.numel())])
    scale = LossScale(num_tokens=num_tokens, num_seqs=num_seqs, max_tokens=float(max_tokens))
    world = float(dist.world_size)
    signal = signal_mask(advantages, extras)  # [N]
    active = rows if objective.trains_every_row else rows[signal[rows]]  # [M'] the rows the forward runs
    out: dict[str, tuple[float, float]] = {}
    packing = get_packing(packing)
    if packing.shares_prefixes:
        for column in (batch.step, batch.traj_id, batch.group_id):  # stable sorts: by group, trajectory, step
            active = active[torch.sort(column[active], stable=True).indices]  # [M']
    micros = split_micro_batches(batch, active, micro_batch_size, micro_batch_tokens, packing)  # [m_k] each
    passes = lockstep_count(dist, len(micros))
    if passes == 0:  # no rank has a row with a learning signal
        return out

    def add(name: str, value: float, weight: float) -> None:
        total, w = out.get(name, (0.0, 0.0))
        out[name] = (total + value * weight, w + weight)

    forward = dict(temperature=temperature, pad_id=pad_id, attention=attention)
    add("loss", 0.0, 1.0)  # this rank's share of the mini-batch loss; present even when it has no rows
    for k in range(passes):
        with gradient_sync(model, k == passes - 1):
            if k >= len(micros):  # this rank is out of rows: a pass that adds nothing, for the collectives
                idle_backward(model, pad_id, autocast)
                continue
            micro = MicroBatch.of(batch, micros[k], advantages, old_logprobs, extras)
            with autocast():  # forward: the policy, and the frozen reference packed alike
                logp, mask, entropy = packing.logprobs(model, micro.prompts, micro.responses, micro.groups,
                                                       with_entropy=True, entropy_grad=objective.entropy_coef > 0,
                                                       **forward)  # [m, R] each
                ref = None
                if objective.kl_coef > 0:
                    with torch.no_grad():
                        ref, _, _ = packing.logprobs(ref_model, micro.prompts, micro.responses, micro.groups,
                                                     **forward)  # [m, R]
            loss, metrics = micro_batch_loss(objective, micro, logp.float(), mask, entropy, ref, scale)
            (loss * world if world != 1 else loss).backward()  # DDP and FSDP average over ranks: times world
        tokens = float(metrics.pop("tokens"))
        for key, value in metrics.items():
            add(key, float(value), tokens)
        out["loss"] = (out["loss"][0] + float(loss.detach()), 1.0)
    return {k: (v / w, w) if k != "loss" else (v, w) for k, (v, w) in out.items()}


def idle_forward(model: torch.nn.Module, pad_id: int) -> Tensor:
    """The logits ``[1, 1, V]`` of one padding token: a forward that a rank without rows
    runs so that its collectives (FSDP's gathers) match the other ranks'."""
    device = next(model.parameters()).device
    return model(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device)).logits


def idle_backward(model: torch.nn.Module, pad_id: int, autocast: Callable[[], ContextManager] = contextlib.nullcontext
                  ) -> None:
    """:func:`idle_forward` and a backward of its logits times zero: it adds nothing to
    any gradient, and takes part in DDP's and FSDP's gradient reductions."""
    with autocast():
        logits = idle_forward(model, pad_id)
    (logits.float().sum() * 0.0).backward()


@dataclass
class MicroBatch:
    """The rows of one micro-batch, padded to its longest response ``R`` where the loss
    reads them as one tensor."""

    prompts: list[Tensor]  # m x [P_i]
    responses: list[Tensor]  # m x [R_i]
    groups: list[list[int]]  # the positions of each group's rows (what the group packing packs)
    loss_mask: Tensor  # [m, R] the tokens the policy sampled (not the environment's)
    old_logprobs: Tensor | None  # [m, R] the ratio's denominator; None: the current log-probs, detached
    rollout_logprobs: Tensor  # [m, R] the engine's log-probs when it sampled
    off_policy: Tensor  # [m] bool, rows sampled by an older policy (AR3PO's reuse)
    advantages: Tensor  # [m]
    streams: dict[str, Tensor]  # the estimator's further [m] streams (COPO's)

    @classmethod
    def of(cls, batch: RolloutBatch, rows: Tensor, advantages: Tensor, old_logprobs: list[Tensor] | None,
           extras: dict[str, Tensor]) -> "MicroBatch":
        """Micro-batch ``rows`` (``[m]`` indices) of ``batch``; ``advantages`` ``[N]``,
        ``old_logprobs`` ``N`` tensors ``[R_i]`` or ``None``, ``extras`` ``[N]`` each."""
        idx = rows.tolist()
        return cls(
            prompts=[batch.prompt_ids[i] for i in idx],
            responses=[batch.response_ids[i] for i in idx],
            groups=micro_groups(batch, idx),
            loss_mask=pad_rows([batch.loss_mask[i] for i in idx], 0.0),  # [m, R]
            old_logprobs=None if old_logprobs is None else pad_rows([old_logprobs[i] for i in idx], 0.0),  # [m, R]
            rollout_logprobs=pad_rows([batch.rollout_logprobs[i] for i in idx], 0.0),  # [m, R]
            off_policy=batch.off_policy[rows],  # [m]
            advantages=advantages[rows],  # [m]
            streams={key: value[rows] for key, value in extras.items()},  # [m] each
        )


def micro_batch_loss(objective: Objective, micro: MicroBatch, logp: Tensor, mask: Tensor, entropy: Tensor,
                     ref: Tensor | None, scale: LossScale) -> tuple[Tensor, dict[str, Tensor | float]]:
    """The loss of one micro-batch, normalised by its mini-batch's counts (``scale``):
    ``objective``'s policy loss, plus ``kl_coef`` times the KL penalty to ``ref``, minus
    ``entropy_coef`` times the entropy; the policy loss weighs off-policy rows by the
    truncated behaviour ratio (:func:`~grpo_lab.losses.behaviour_weights`).

    The tokens each term sees: rollout rejection (``objective.rejection``) removes tokens
    from every term and its normalisers (verl's); the off-policy sequence mask and the
    top-entropy selection (``off_policy_mask_threshold``, ``top_entropy_quantile``)
    multiply the policy loss's per-token term (after its row statistics, over every
    token), the latter also the entropy bonus's, with the normalisers unchanged, as TRL
    applies them; the KL term sees every token.

    Args:
        logp: ``[m, R]`` float32 log-probs of the responses under the policy (with grad).
        mask: ``[m, R]`` the real response positions of the forward.
        entropy: ``[m, R]`` the policy's entropy per position.
        ref: ``[m, R]`` the reference's log-probs, or ``None`` without a KL term.

    Returns:
        the loss (a scalar with grad) and its metrics: token-weighted means, with
        ``tokens`` (their weight) and ``logprob_diff_rollout`` (mean |log-prob - the
        engine's log-prob|, the train/inference mismatch).
    """
    device = logp.device
    mask = mask * micro.loss_mask.to(device)  # [m, R]
    old = logp.detach() if micro.old_logprobs is None else micro.old_logprobs.to(device)  # [m, R]
    rollout = micro.rollout_logprobs.to(device)  # [m, R]
    tis, metrics = behaviour_weights(old, rollout, mask, micro.off_policy.to(device), objective.tis_cap,
                                     objective.off_policy_is_cap, objective.tis_level)  # [m, R], or None: no weights
    if objective.rejection is not None:  # the tokens or rows whose ratio to the engine's leaves the band
        keep, rejected = rejection_keep(old, rollout, mask, objective.rejection, *objective.rejection_band)  # [m, R]
        mask = mask * keep  # [m, R]
        metrics.update(rejected)
    streams = {key: value.to(device) for key, value in micro.streams.items()}  # [m] each
    advantages = micro.advantages.to(device)  # [m]
    keep, entropy_keep = None, None  # [m, R] or [m, 1]: selections multiplying the per-token loss
    if objective.off_policy_mask_threshold is not None:  # DeepSeek-V3.2: far off-policy rows with A < 0 leave
        keep, masked = off_policy_sequence_keep(advantages, logp, rollout, mask,
                                                objective.off_policy_mask_threshold)  # [m, 1]
        metrics.update(masked)
    if objective.top_entropy_quantile < 1:  # the high-entropy tokens only
        entropy_keep, selected = high_entropy_keep(entropy, mask, objective.top_entropy_quantile)  # [m, R]
        keep = entropy_keep if keep is None else keep * entropy_keep  # [m, R]
        metrics.update(selected)
    loss, pg_metrics = objective.policy_loss(logp, old, advantages, mask, objective, scale=scale, entropy=entropy,
                                             tis_weights=tis, keep=keep, streams=streams)  # []
    metrics.update(pg_metrics)
    if objective.entropy_coef > 0:
        bonus = entropy if entropy_keep is None else entropy * entropy_keep  # [m, R]
        loss = loss - objective.entropy_coef * aggregate(bonus, mask, objective.aggregation, scale)  # []
    if ref is not None:
        kl = kl_penalty(logp, ref.float(), objective.kl_estimator)  # [m, R]
        if objective.kl_bias_correction:
            kl = bias_corrected_kl(kl, logp, old)  # [m, R]
        loss = loss + objective.kl_coef * aggregate(kl, mask, objective.aggregation, scale)  # []
        metrics["kl_ref"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    tokens = float(mask.sum())
    metrics["logprob_diff_rollout"] = float(((logp.detach() - rollout).abs() * mask).sum()) / max(tokens, 1.0)
    metrics["tokens"] = tokens
    return loss, metrics
