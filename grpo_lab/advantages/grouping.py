"""Vectorized group statistics shared by the estimators (sort/unique/scatter, no row loops)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NORM_MODES = ("mean_norm", "mean_std_norm")


def dense_ids(ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary ids ``[N]`` to ``0..K-1`` (``[N]``) and return ``K``."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    return inverse, unique.numel()


def pair_ids(a: Tensor, b: Tensor) -> tuple[Tensor, int]:
    """Dense ids ``[N]`` of the pairs ``(a_i, b_i)``: equal iff both parts are equal."""
    a_dense, _ = dense_ids(a)
    b_dense, nb = dense_ids(b)
    return dense_ids(a_dense * nb + b_dense)


def trajectory_table(rewards: Tensor, traj_id: Tensor, group_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-episode returns and groups.

    Args:
        rewards: ``[N]`` step rewards.
        traj_id: ``[N]`` episode of each row.
        group_id: ``[N]`` group of each row; all rows of an episode must share it.

    Returns:
        ``returns`` ``[T]`` (undiscounted sum of each episode's rewards), ``traj_group``
        ``[T]`` (dense group index of each episode) and ``row_traj`` ``[N]`` (dense episode
        index of each row).
    """
    row_traj, num_traj = dense_ids(traj_id)
    row_group, _ = dense_ids(group_id)
    returns = torch.zeros(num_traj, dtype=rewards.dtype).index_add_(0, row_traj, rewards)
    lo = torch.full((num_traj,), torch.iinfo(torch.long).max).scatter_reduce(0, row_traj, row_group, "amin")
    hi = torch.full((num_traj,), -1).scatter_reduce(0, row_traj, row_group, "amax")
    if not torch.equal(lo, hi):
        bad = int(torch.nonzero(lo != hi)[0])
        raise ValueError(f"episode {int(torch.unique(traj_id)[bad])} has rows in more than one group")
    return returns, lo, row_traj


def group_moments(values: Tensor, group: Tensor, num_groups: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, unbiased std, size and "all equal" flag of ``values`` per group.

    Args:
        values: ``[M]`` float.
        group: ``[M]`` dense group index in ``0..K-1``.

    Returns:
        ``mean`` ``[K]``, ``std`` ``[K]`` (Bessel-corrected; 0 for groups of one),
        ``count`` ``[K]`` and ``constant`` ``[K]`` (bool: every value in the group is equal,
        which includes groups of one). :func:`weighted_group_moments` with unit weights.
    """
    k = (int(group.max()) + 1 if group.numel() else 0) if num_groups is None else num_groups
    ones = torch.ones_like(values)
    count = torch.zeros(k, dtype=values.dtype).index_add_(0, group, ones)
    mean, std, constant = weighted_group_moments(values, ones, group, count)
    return mean, std, count, constant


def episode_weights(row_traj: Tensor, traj_group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row weights under which each episode counts once.

    Args:
        row_traj: ``[N]`` dense episode index of each row; traj_group: ``[T]`` dense group
            index of each episode (both from :func:`trajectory_table`).

    Returns:
        ``weight`` ``[N]`` (``1 / length`` of the row's episode), ``units`` ``[K]`` (episodes
        per group: what the weights of a group add up to) and ``row_group`` ``[N]``.
    """
    length = torch.zeros(traj_group.numel(), dtype=torch.float64).index_add_(0, row_traj, torch.ones(row_traj.numel(), dtype=torch.float64))
    k = int(traj_group.max()) + 1 if traj_group.numel() else 0
    units = torch.zeros(k, dtype=torch.float64).index_add_(0, traj_group, torch.ones(traj_group.numel(), dtype=torch.float64))
    return 1.0 / length[row_traj], units, traj_group[row_traj]


def weighted_group_moments(values: Tensor, weight: Tensor, group: Tensor, units: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, Bessel-corrected std and "all equal" flag per group, each row weighted.

    Args:
        values, weight: ``[M]``; group: ``[M]`` dense index in ``0..K-1``.
        units: ``[K]``, what the weights of each group add up to (the sample size the
            std corrects for): episodes when each row weighs ``1 / episode length``, rows
            when every weight is 1.

    Returns:
        ``mean`` ``[K]`` (``sum(w v) / units``), ``std`` ``[K]`` (``sqrt(sum(w (v - mean)^2) /
        (units - 1))``, 0 where ``units <= 1``) and ``constant`` ``[K]`` (all values equal).
        With one value per unit this is :func:`group_moments`.
    """
    k = units.numel()
    mean = torch.zeros(k, dtype=values.dtype).index_add_(0, group, weight * values) / units.clamp(min=1)
    sq = torch.zeros(k, dtype=values.dtype).index_add_(0, group, weight * (values - mean[group]) ** 2)
    std = torch.where(units > 1, (sq / (units - 1).clamp(min=1)).clamp(min=0).sqrt(), torch.zeros_like(sq))
    vmax = torch.full((k,), -torch.inf, dtype=values.dtype).scatter_reduce(0, group, values, "amax")
    vmin = torch.full((k,), torch.inf, dtype=values.dtype).scatter_reduce(0, group, values, "amin")
    return mean, std, vmax == vmin


def normalize_weighted(values: Tensor, weight: Tensor, group: Tensor, units: Tensor, mode: str,
                       eps: float) -> tuple[Tensor, Tensor]:
    """:func:`normalize_in_groups` with weighted statistics (:func:`weighted_group_moments`).
    A group whose values are all equal, whose ``units`` are at most 1 (no baseline) or
    whose std underflows to 0 gets exactly 0. Returns ``[M]`` and the "no signal" flags ``[K]``."""
    if mode not in NORM_MODES:
        raise ValueError(f"normalisation mode must be one of {NORM_MODES}, got {mode!r}")
    mean, std, constant = weighted_group_moments(values, weight, group, units)
    constant = constant | (units <= 1)
    out = values - mean[group]
    if mode == "mean_std_norm":
        constant = constant | (std + eps == 0)
        out = out / (std[group] + eps)
    return torch.where(constant[group], torch.zeros_like(out), out), constant


def normalize_in_groups(values: Tensor, group: Tensor, mode: str, eps: float) -> tuple[Tensor, Tensor]:
    """``values`` ``[M]`` minus their group's mean (``mean_norm``), and over the group's std
    plus ``eps`` (``mean_std_norm``). A group whose values are all equal, a group of one
    included, gets exactly 0, and so does a group whose std underflows to 0. Returns the
    normalised values ``[M]`` and the per-group "no signal" flags ``[K]``.
    :func:`normalize_weighted` with unit weights."""
    ones = torch.ones_like(values)
    count = torch.zeros(int(group.max()) + 1 if group.numel() else 0, dtype=values.dtype).index_add_(0, group, ones)
    return normalize_weighted(values, ones, group, count, mode, eps)


@dataclass(frozen=True)
class EpisodeGroups:
    """The episodes of a batch and their groups, for the estimators that score whole
    episodes by their returns (each episode counted once)."""

    returns: Tensor  # [T] float64, each episode's return
    traj_group: Tensor  # [T] dense group of each episode
    row_traj: Tensor  # [N] dense episode of each row
    tokens: Tensor  # [T] trained tokens of each episode (its rows' lengths; a row without one counts 1)
    group_size: Tensor  # [K] episodes per group
    mean: Tensor  # [K] the group's mean return
    std: Tensor  # [K] the group's Bessel-corrected std of returns
    no_signal: Tensor  # [K] bool: every return equal, or a group of one (no baseline)

    def frac_no_signal(self) -> float:
        """The share of groups without a signal (logged as ``frac_zero_std_groups``)."""
        return float(self.no_signal.float().mean())


def episode_groups(inputs) -> EpisodeGroups:
    """:class:`EpisodeGroups` of ``inputs`` (an ``AdvantageInputs`` with at least one row)."""
    returns, traj_group, row_traj = trajectory_table(inputs.rewards.to(torch.float64), inputs.traj_id, inputs.group_id)
    tokens = torch.zeros_like(returns).index_add_(0, row_traj, inputs.row_lengths())  # [T]
    k = int(traj_group.max()) + 1 if traj_group.numel() else 0
    group_size = torch.zeros(k, dtype=torch.float64).index_add_(0, traj_group, torch.ones_like(returns))  # [K]
    mean, std, constant = weighted_group_moments(returns, torch.ones_like(returns), traj_group, group_size)  # [K] each
    return EpisodeGroups(returns, traj_group, row_traj, tokens, group_size, mean, std, constant | (group_size <= 1))


def whiten(values: Tensor, weight: Tensor, eps: float = 1e-8) -> Tensor:
    """``(values - mean) / sqrt(var + eps)`` with the mean and the Bessel-corrected variance
    taken over ``weight`` units (``values`` ``[M]``, ``weight`` ``[M]``: each value counts
    ``weight`` times, as verl's ``masked_whiten`` counts every token of a response)."""
    total = weight.sum()
    if values.numel() == 0:
        return values.clone()
    mean = (weight * values).sum() / total.clamp(min=1e-12)
    var = (weight * (values - mean) ** 2).sum() / (total - 1).clamp(min=1e-12) if total > 1 else values.new_zeros(())
    return (values - mean) * torch.rsqrt(var + eps)


def discounted_returns(rewards: Tensor, traj_id: Tensor, step: Tensor, gamma: float) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` inside each episode, ``[N]`` in the input's row order.

    The loop runs over step indices (at most the longest episode), each iteration
    vectorized over all rows at that step; steps of an episode must be ``0..L-1``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    n = rewards.numel()
    if n == 0:
        return rewards.clone()
    order = torch.argsort(traj_id * (int(step.max()) + 1) + step)
    r, t, s = rewards[order], traj_id[order], step[order]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = t[1:] != t[:-1]
    # the step must count 0, 1, 2, ... from each episode's first row
    start_index = torch.cummax(torch.where(first, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    if not torch.equal(s, torch.arange(n) - start_index):
        bad = int(torch.nonzero(s != torch.arange(n) - start_index)[0])
        raise ValueError(f"episode {int(t[bad])} has steps that do not count 0, 1, 2, ... (found step {int(s[bad])})")
    has_next = torch.zeros(n, dtype=torch.bool)
    has_next[:-1] = t[1:] == t[:-1]
    out = r.clone()
    for k in range(int(s.max()) - 1, -1, -1):
        rows = torch.nonzero((s == k) & has_next).flatten()
        out[rows] = r[rows] + gamma * out[rows + 1]
    result = torch.empty_like(out)
    result[order] = out
    return result
