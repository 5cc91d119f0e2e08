"""M-GRPO: hierarchical group-relative advantages for a main agent and its sub-agents.

Hong et al. 2025, "Multi-Agent Deep Research: Training Multi-Agent Systems with M-GRPO"
(arXiv:2511.13288). A task is played K times by a main agent (role 0, a planner) that
invokes sub-agents (roles 1, 2, ...; an executor) a varying number of times. Each role
trains its own policy on its own rows, with a group-relative advantage:

- **Main agent**: the K episodes of a task form its group (GRPO). Its score is the main
  agent's return ``R_k`` (the rewards of the episode's role-0 rows: the task's final
  reward), ``A_k = (R_k - mean_K R) / (std_K R + eps)`` on every role-0 row of episode ``k``.
- **Sub-agents**: per (task, role), the invocations of that role across the K episodes.
  Episode ``k`` made ``d_k`` of them; *trajectory alignment* brings every episode to
  ``D`` (``d_max``): ``D - d_k`` of its invocations, drawn at random, count twice (or
  more), or ``d_k - D``, drawn at random, are dropped, so the group holds ``K * D``
  units. A unit's score is its episode's main return plus the invocation's own reward
  (the rewards of its rows: a sub-task reward, where the task defines one),
  ``s = R_k + r_sub``, and ``A = (s - mean) / (std + eps)`` over the ``K * D`` units.

Stated where the paper's public text is silent (our reading): ``D`` defaults to the most
invocations any episode of the group made (nothing is dropped; pass ``d_max`` to fix
it); a duplicated unit counts ``m`` times in the statistics and its rows' advantages are
multiplied by ``m`` (in place of copying its rows: the same gradient as ``m`` copies
under a sum over tokens); a dropped unit's rows get 0 and leave the statistics; the
random choices are a function of the task's group id and the role, so the estimator is
deterministic; an episode without an invocation of a role adds no unit to that role's
group. The std is Bessel-corrected over units (GRPO's), ``eps = 1e-6``; a group whose
scores are all equal, or of one unit, gets 0. A batch whose rows are all role 0 is GRPO.
"""

from __future__ import annotations

import random

import torch

from .grouping import dense_ids, trajectory_table
from .registry import AdvantageInputs, AdvantageOutput, register_estimator


def aligned_multiplicities(episodes: list[list[int]], d_max: int, rng: random.Random) -> dict[int, int]:
    """``{unit: m}`` for one (task, role) group: each episode's list of unit ids brought to
    ``d_max`` units (duplicates drawn at random, with replacement, where it has fewer;
    ``d_max`` of them drawn without replacement where it has more); an episode without a
    unit contributes none."""
    out: dict[int, int] = {}
    for units in episodes:
        if not units:
            continue
        kept = list(units) if len(units) <= d_max else rng.sample(list(units), d_max)
        for u in kept:
            out[u] = 1
        for _ in range(max(d_max - len(units), 0)):
            out[kept[rng.randrange(len(kept))]] += 1
    return out


def weighted_standardise(scores: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """``(s - mean) / (std + eps)`` with each score counted ``weight`` times (the std
    Bessel-corrected over the total count); 0 when the scores are all equal or count once."""
    n = float(weights.sum())
    if n <= 1:
        return torch.zeros_like(scores)
    mean = (weights * scores).sum() / n
    var = (weights * (scores - mean) ** 2).sum() / (n - 1)
    if bool((scores == scores[0]).all()):
        return torch.zeros_like(scores)
    return (scores - mean) / (var.sqrt() + eps)


@register_estimator("mgrpo")
def mgrpo(inputs: AdvantageInputs, *, d_max: int | None = None, eps: float = 1e-6, seed: int = 0) -> AdvantageOutput:
    """Main agent's GRPO over a task's episodes; each sub-agent's over its aligned invocations (M-GRPO).

    Args:
        inputs: rows with ``rewards``, ``group_id``, ``traj_id`` and, for several roles,
            ``role`` (0 the main agent) and ``invocation`` (a sub-agent row's invocation
            index within its episode and role; -1 on main-agent rows), ``[N]`` each.
        d_max: invocations per episode after alignment (None: the group's most).
        eps: added to the std.
        seed: mixed into the alignment's random choices.

    Returns:
        ``[N]`` advantages (a dropped invocation's rows: 0) and the metrics
        ``frac_zero_std_groups`` (the main agent's groups), ``mgrpo_units_duplicated`` and
        ``mgrpo_units_dropped``.
    """
    inputs.no_row_penalty("mgrpo")
    if d_max is not None and d_max < 1:
        raise ValueError(f"d_max must be None or >= 1, got {d_max}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    n = inputs.rewards.numel()
    if n == 0:
        return AdvantageOutput.no_rows()
    role = inputs.role if inputs.role is not None else torch.zeros(n, dtype=torch.long)  # [N]
    invocation = inputs.invocation if inputs.invocation is not None else torch.full((n,), -1)  # [N]
    wrong = (role < 0) | ((role == 0) & (invocation != -1)) | ((role > 0) & (invocation < 0))  # [N]
    if bool(wrong.any()):
        bad = int(torch.nonzero(wrong)[0])
        raise ValueError(f"row {bad}: roles are >= 0, a main-agent row (role 0) has invocation -1 and a sub-agent row "
                         f"an invocation >= 0; got role {int(role[bad])}, invocation {int(invocation[bad])}")
    rewards = inputs.rewards.to(torch.float64)  # [N]
    trajectory_table(rewards, inputs.traj_id, inputs.group_id)  # raises for an episode whose rows span groups
    traj, num_traj = dense_ids(inputs.traj_id)  # [N] in 0..E-1
    main = role == 0  # [N]
    main_return = torch.zeros(num_traj, dtype=torch.float64).index_add_(0, traj[main], rewards[main])  # [E]
    adv = torch.zeros(n, dtype=torch.float64)  # [N]
    # the main agent: GRPO over each group's episodes
    groups: dict[int, list[int]] = {}
    for e, g in zip(traj.tolist(), inputs.group_id.tolist()):
        groups.setdefault(g, [])
        if e not in groups[g]:
            groups[g].append(e)
    silent = 0
    for g, episodes in groups.items():
        ids = torch.tensor(episodes)  # [K]
        a = weighted_standardise(main_return[ids], torch.ones(len(episodes), dtype=torch.float64), eps)  # [K]
        silent += int(bool((a == 0).all()))
        per_episode = torch.zeros(num_traj, dtype=torch.float64).index_copy_(0, ids, a)  # [E]
        rows = main & (inputs.group_id == g)  # [N]
        adv[rows] = per_episode[traj[rows]]
    # each sub-agent role: its invocations, aligned, over the group's episodes
    unit, num_units = dense_ids(traj * (int(invocation.max()) + 2) * (int(role.max()) + 1)
                                + (invocation + 1) * (int(role.max()) + 1) + role)  # [N] one id per (episode, invocation, role)
    duplicated = dropped = 0
    for r in sorted(set(role[~main].tolist())):
        for g, episodes in groups.items():
            rows = (role == r) & (inputs.group_id == g)  # [N]
            if not bool(rows.any()):
                continue
            per_episode = [sorted(set(unit[rows & (traj == e)].tolist())) for e in episodes]
            d = d_max if d_max is not None else max(len(u) for u in per_episode)
            rng = random.Random(hash((seed, int(g), int(r))) & 0xFFFFFFFF)
            mult = aligned_multiplicities(per_episode, d, rng)
            all_units = [u for units in per_episode for u in units]
            dropped += len(all_units) - len(mult)
            duplicated += sum(m - 1 for m in mult.values())
            if not mult:
                continue
            ids = torch.tensor(sorted(mult))  # [U]
            own = torch.zeros(num_units, dtype=torch.float64).index_add_(0, unit[rows], rewards[rows])  # [units]
            unit_episode = torch.zeros(num_units, dtype=torch.long).index_copy_(0, unit[rows], traj[rows])  # [units]
            scores = main_return[unit_episode[ids]] + own[ids]  # [U]
            weights = torch.tensor([float(mult[u]) for u in sorted(mult)], dtype=torch.float64)  # [U]
            a = weighted_standardise(scores, weights, eps) * weights  # [U] a duplicate's rows train m times
            per_unit = torch.zeros(num_units, dtype=torch.float64).index_copy_(0, ids, a)  # [units]
            adv[rows] = per_unit[unit[rows]]
    metrics = {"frac_zero_std_groups": silent / max(len(groups), 1), "mgrpo_units_duplicated": float(duplicated),
               "mgrpo_units_dropped": float(dropped)}
    return AdvantageOutput(adv.to(inputs.rewards.dtype), metrics)
