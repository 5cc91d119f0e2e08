"""What a rollout lost to faults, and the batch without the lost episodes.

An episode whose environment raised, hung or returned a non-finite reward, or whose
prompt could not be made to fit the model's context, is dropped from the batch whole. A
group keeps its surviving members when at least two remain (one for groups of one, as in
evaluation); otherwise the rest of it goes too, since a group of one has no baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Protocol, TypeVar

from .env_pool import EnvFault

log = logging.getLogger("grpo_lab")

#: metrics.jsonl key of each fault kind
FAULT_METRICS = {"error": "env_errors", "timeout": "env_timeouts", "nonfinite": "env_nonfinite_rewards",
                 "overlong": "overlong_dropped"}


@dataclass
class FaultLog:
    """Counts of one rollout: ``episodes`` started, ``episodes_dropped`` (failed),
    ``groups_dropped`` (fewer than two members left), each fault kind
    (:data:`FAULT_METRICS`), ``overlong_truncated`` (prompts that fitted only after
    dropping their oldest turns) and ``overlong_ended`` (conversation episodes ended at
    the token limit; they stay in the batch). ``examples`` keeps the first faults' lines."""

    episodes: int = 0
    episodes_dropped: int = 0
    groups_dropped: int = 0
    env_errors: int = 0
    env_timeouts: int = 0
    env_nonfinite_rewards: int = 0
    overlong_dropped: int = 0
    overlong_truncated: int = 0
    overlong_ended: int = 0
    examples: list[str] = field(default_factory=list)

    MAX_EXAMPLES = 5

    def record(self, fault: EnvFault) -> None:
        """Count an episode lost to ``fault`` and log it (environment, seed, step, cause)."""
        self.episodes_dropped += 1
        key = FAULT_METRICS[fault.kind]
        setattr(self, key, getattr(self, key) + 1)
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(str(fault))
        log.warning("episode dropped: %s", fault)

    @property
    def fault_rate(self) -> float:
        return self.episodes_dropped / self.episodes if self.episodes else 0.0

    def metrics(self) -> dict[str, float]:
        keys = ("episodes_dropped", "groups_dropped", "env_errors", "env_timeouts", "env_nonfinite_rewards",
                "overlong_dropped", "overlong_truncated", "overlong_ended")
        return {key: getattr(self, key) for key in keys}


class RowLike(Protocol):
    """What :func:`drop_failed` reads of a row (an :class:`~grpo_lab.rollout.episode.Row`)."""

    group_id: int
    traj_id: int
    done: bool


R = TypeVar("R", bound=RowLike)


def drop_failed(rows: list[R], failed: Mapping[int, int], faults: FaultLog, min_members: int = 2) -> list[R]:
    """``rows`` without the trajectories in ``failed`` (``{traj_id: group_id}``) and
    without the groups these leave with fewer than ``min_members`` finished trajectories
    (counted in ``faults.groups_dropped``, a group lost whole included)."""
    if not failed:
        return rows
    touched = set(failed.values())
    kept = [r for r in rows if r.traj_id not in failed]
    members: dict[int, set[int]] = {g: set() for g in touched}
    for r in kept:
        if r.group_id in members and r.done:
            members[r.group_id].add(r.traj_id)
    gone = {g for g, m in members.items() if len(m) < min_members}
    faults.groups_dropped += len(gone)
    return [r for r in kept if r.group_id not in gone]
