"""Adaptive rollout with response reuse (AR3PO).

Zhang et al., 2025, "Improving Sampling Efficiency in RLVR through Adaptive Rollout and
Response Reuse" (AR3PO, arXiv 2509.25808):

- **Adaptive rollout.** Sampling runs in ``stages``; each stage gives
  ``responses_per_stage`` new responses to every prompt still in the pool, and a prompt
  leaves the pool as soon as one of its responses is correct. Easy prompts stop after
  the first stage, hard ones get up to ``stages * responses_per_stage``.
- **Response reuse.** A prompt that is still unsolved after the last stage gets one
  correct response of an earlier step from a per-prompt buffer, in place of one of its
  wrong responses (the group keeps its size), so its wrong responses get a negative
  advantage instead of none. New correct responses go into the buffer after each step.
- **The reused response's importance ratio** (it was sampled by an older policy; its
  rows carry ``off_policy = True`` and keep that policy's log-probs from the buffer):
  ``reuse_mode="stop_gradient"`` (the paper's better option, our default) keeps it only
  in the group's statistics: its ``loss_mask`` is zero, so it gets no gradient and does
  not count in the token normaliser. ``reuse_mode="off_policy"`` trains on it with the
  importance weight ``min(pi_old / pi_behaviour, algo.off_policy_is_cap)`` per token
  (:func:`~grpo_lab.losses.behaviour_weights`; ``pi_old`` is the policy the
  update starts from, and the PPO ratio ``pi / pi_old`` is clipped as usual). The cap
  (default 2) is ours: the paper states no truncation.

Departures: the "response" is an episode of an agent environment and "correct" means
the episode was won; a prompt is identified by its task key (the initial state's anchor,
so that tasks that start alike share a buffer); the advantage is whatever estimator the
run uses, over each prompt's whole group (all stages, the reused episode included), with
group sizes that differ between prompts.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Sequence

import torch

from ..data import RolloutBatch

REUSE_MODES = ("stop_gradient", "off_policy")


@dataclass
class AdaptiveConfig:
    """AR3PO's sampling schedule and reuse buffer."""

    stages: int = 2
    responses_per_stage: int = 4
    reuse: bool = True
    reuse_mode: str = "stop_gradient"
    buffer_size: int = 4  # correct episodes kept per task (the most recent)

    def __post_init__(self) -> None:
        for name in ("stages", "responses_per_stage", "buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"adaptive {name} must be >= 1, got {getattr(self, name)}")
        if self.reuse_mode not in REUSE_MODES:
            raise ValueError(f"reuse_mode {self.reuse_mode!r} is not one of {list(REUSE_MODES)}")

    @property
    def max_responses(self) -> int:
        return self.stages * self.responses_per_stage


class ReuseBuffer:
    """The most recent ``capacity`` correct episodes of each task (one-episode batches)."""

    def __init__(self, capacity: int, rng: random.Random) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.rng = capacity, rng
        self._episodes: dict[Hashable, deque[RolloutBatch]] = {}  # a plain dict, so that checkpoints can pickle it

    def add(self, key: Hashable, episode: RolloutBatch) -> None:
        if len(set(episode.traj_id.tolist())) != 1:
            raise ValueError("the buffer takes one episode at a time")
        if not bool(episode.won.any()):
            raise ValueError("the buffer keeps correct (won) episodes only")
        self._episodes.setdefault(key, deque(maxlen=self.capacity)).append(episode)

    def sample(self, key: Hashable) -> RolloutBatch | None:
        """A random stored episode of ``key``, or ``None``."""
        stored = self._episodes.get(key)
        return self.rng.choice(list(stored)) if stored else None

    def __len__(self) -> int:
        return sum(len(v) for v in self._episodes.values())

    def size(self, key: Hashable) -> int:
        return len(self._episodes.get(key, ()))


@dataclass
class AdaptiveStats:
    """``responses``: episodes generated per task (``[T]``); ``stages_run``; ``reused``:
    tasks that got a buffered episode; ``unsolved``: tasks without a correct generated
    episode; ``reused_rows``: row indices of the batch that came from the buffer."""

    responses: list[int]
    stages_run: int
    reused: int
    unsolved: int
    reused_rows: list[int] = field(default_factory=list)

    @property
    def responses_per_prompt(self) -> float:
        return sum(self.responses) / max(1, len(self.responses))


def relabel(batch: RolloutBatch, group_id: int, first_traj_id: int) -> RolloutBatch:
    """The rows of one task's episodes with ``group_id`` and dense trajectory ids from
    ``first_traj_id`` (in the order the episodes first appear)."""
    _, inverse = torch.unique_consecutive(batch.traj_id, return_inverse=True)
    return replace(batch, group_id=torch.full_like(batch.group_id, group_id), traj_id=inverse + first_traj_id)


def episodes_of(batch: RolloutBatch) -> list[RolloutBatch]:
    """The batch cut into one batch per trajectory (rows grouped by trajectory)."""
    out, ids = [], batch.traj_id.tolist()
    start = 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or ids[k] != ids[start]:
            out.append(batch.select(range(start, k)))
            start = k
    return out


def adaptive_rollout(
    play: Callable[[Sequence[int], int, int], RolloutBatch],
    seeds: Sequence[int],
    keys: Sequence[Hashable],
    config: AdaptiveConfig,
    buffer: ReuseBuffer | None,
    first_group_id: int = 0,
) -> tuple[RolloutBatch, AdaptiveStats]:
    """Run AR3PO's stages over ``seeds`` and apply response reuse.

    Args:
        play: ``play(seeds, n, stage)`` plays ``n`` episodes from each seed and returns
            them as a batch (rows grouped by trajectory; groups numbered consecutively
            in the order of ``seeds``), or ``(batch, first_group_id)`` when failed
            episodes may have left groups out of the batch, e.g. through
            :func:`~grpo_lab.rollout.agent_loop.run_episodes`. Give every stage its own
            group (and so trajectory) ids when requests are seeded by trajectory.
        keys: each task's buffer key.
        buffer: the reuse buffer (``None``: no reuse); it receives this step's correct
            episodes after reuse is decided.

    Returns the batch (task ``i`` is group ``first_group_id + i``; trajectory ids are
    ``group * max_responses + k``) and the stats. Reused rows have ``off_policy`` set,
    and ``loss_mask`` zero when ``config.reuse_mode == "stop_gradient"``.
    """
    if len(seeds) != len(keys):
        raise ValueError(f"{len(seeds)} seeds but {len(keys)} keys")
    T, cap = len(seeds), config.max_responses
    episodes: list[list[RolloutBatch]] = [[] for _ in range(T)]
    solved = [False] * T
    stages_run = 0
    for stage in range(config.stages):
        pool = [i for i in range(T) if not solved[i]]
        if not pool:
            break
        stages_run += 1
        out = play([seeds[i] for i in pool], config.responses_per_stage, stage)
        batch, base = out if isinstance(out, tuple) else (out, int(out.group_id.min()) if len(out) else 0)
        for ep in episodes_of(batch):
            i = pool[int(ep.group_id[0]) - base]
            episodes[i].append(ep)
            solved[i] = solved[i] or bool(ep.won.any())
    responses = [len(e) for e in episodes]
    unsolved = [i for i in range(T) if not solved[i]]
    reused_from: dict[int, int] = {}  # task -> index of the inserted episode
    if buffer is not None and config.reuse:
        for i in unsolved:
            old = buffer.sample(keys[i])
            if old is None or not episodes[i]:  # nothing to replace when every episode failed
                continue
            old = replace(old, off_policy=torch.ones_like(old.off_policy))
            if config.reuse_mode == "stop_gradient":
                old = replace(old, loss_mask=[torch.zeros_like(m) for m in old.loss_mask])
            episodes[i][-1] = old  # replaces a wrong episode: the group keeps its size
            reused_from[i] = len(episodes[i]) - 1
    parts, reused_rows, offset = [], [], 0
    for i in range(T):
        group = first_group_id + i
        for k, ep in enumerate(episodes[i]):
            part = relabel(ep, group, group * cap + k)
            if reused_from.get(i) == k:
                reused_rows.extend(range(offset, offset + len(part)))
            parts.append(part)
            offset += len(part)
    if buffer is not None:
        for i in range(T):
            for k, ep in enumerate(episodes[i]):
                if reused_from.get(i) != k and bool(ep.won.any()):
                    buffer.add(keys[i], ep)
    stats = AdaptiveStats(responses, stages_run, len(reused_from), len(unsolved), reused_rows)
    return RolloutBatch.concat(parts), stats
