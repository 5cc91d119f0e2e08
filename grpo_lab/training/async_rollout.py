"""Generation ahead of training, bounded in staleness (``trainer.async``).

With engines in their own processes (``rollout.engines``, ``rollout.engine_urls``) the
trainer's devices are free while the engines generate, and the engines idle while the
trainer updates. :class:`RolloutAhead` runs the rollouts of the coming steps in a thread
of the trainer's process (the sampler, the environment workers and the HTTP calls to the
engines: all of it waits on other processes) while the main thread trains, as verl's
fully-async trainer, AReaL and NeMo-RL's one-step off-policy mode do.

The bound (``rollout.max_staleness = k``): the rollout of step ``t`` starts only once the
engines serve policy version ``t - k`` or newer (version ``v``: the weights after ``v``
RL steps). Step ``t`` trains on the weights of version ``t``, so every row it trains was
sampled at most ``k`` versions earlier; pushes made while a rollout runs only make its
later turns fresher. ``k = 0`` is the synchronous run: the rollout of step ``t`` starts
after the push of version ``t``, and every draw happens in the same order (tested: the
same losses and success, step for step).

Rows sampled by an older version than the one being trained are off-policy: they are
trained with the decoupled objective (the PPO ratio against the trainer's proximal
policy, weighted by ``min(pi_prox / pi_behaviour, algo.off_policy_is_cap)``,
:func:`~grpo_lab.losses.behaviour_weights`, the code that weighs AR3PO's reused rows).

Resume: :meth:`RolloutAhead.state` is what a checkpoint of step ``s`` keeps of the
rollouts: the finished, untrained batches of the steps after ``s`` (their tokens, log-probs
and versions), and the samplers' state before the first rollout not finished, which a
resumed run plays again from the same draws. A run stopped at any point and resumed
trains the same episodes (the same tasks, seeds and group numbers) as one that ran
through, none lost and none twice (tested).

Departure, stated: a batch is a whole step's rollout (verl's and AReaL's streaming of
single groups into the trainer is not done). A request in flight at a push finishes on
the weights it started with (``rollout.partial_rollout=finish``: the engine holds new
requests during the swap), or is cut short and continued on the new ones (``continue``),
its row then taking the oldest version among its tokens; a multi-turn episode's turns
may come from several versions.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..data import RolloutBatch
from ..rollout.faults import FaultLog

__all__ = ["Collected", "RolloutAhead", "RolloutFailed", "mark_stale"]

log = logging.getLogger("grpo_lab")


@dataclass
class Collected:
    """The rollout of one step: its batch, its counts (``stats``, ``faults``), its wall
    time, and the samplers' state before it (:meth:`RolloutAhead.state`)."""

    step: int
    batch: RolloutBatch
    stats: dict[str, Any] = field(default_factory=dict)
    faults: FaultLog = field(default_factory=FaultLog)
    seconds: float = 0.0
    state_before: dict[str, Any] | None = None


class RolloutFailed(RuntimeError):
    """The rollout thread stopped without the batch the trainer waits for."""


def mark_stale(batch: RolloutBatch, version: int) -> dict[str, float]:
    """Mark the rows of ``batch`` sampled by a policy older than ``version`` off-policy
    (in place); their staleness (``version`` minus the row's ``policy_version``; rows of
    unknown version count as fresh) as metrics."""
    known = batch.policy_version >= 0  # [N]
    stale = (version - batch.policy_version).clamp(min=0) * known  # [N]
    batch.off_policy = batch.off_policy | (stale > 0)  # [N]
    n = max(len(batch), 1)
    return {"staleness_mean": float(stale.sum()) / n, "staleness_max": float(stale.max()) if len(batch) else 0.0,
            "stale_rows_frac": float((stale > 0).sum()) / n}


class RolloutAhead:
    """The rollouts of steps ``first_step`` .. ``total_steps - 1``, made by ``produce``
    in a thread of their own, at most ``max_staleness`` versions ahead of the weights
    :meth:`publish` announces.

    Args:
        produce: ``step -> (batch, stats, faults)``: the step's rollout.
        snapshot: the samplers' state now (copies).
        first_step, total_steps: the steps to make rollouts for.
        max_staleness: ``k``.
        version: the policy version the engines serve now.
        pending: finished rollouts of the first steps (from a checkpoint).
    """

    def __init__(self, produce: Callable[[int], tuple[RolloutBatch, dict, FaultLog]], snapshot: Callable[[], dict[str, Any]],
                 first_step: int, total_steps: int, max_staleness: int, version: int,
                 pending: list[Collected] | tuple[Collected, ...] = ()) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.produce, self.snapshot = produce, snapshot
        self.total_steps, self.max_staleness, self.version = total_steps, max_staleness, version
        self.ready: dict[int, Collected] = {}
        for k, item in enumerate(pending):
            if item.step != first_step + k:
                raise ValueError(f"the saved rollouts are of steps {[c.step for c in pending]}, expected "
                                 f"{first_step}, {first_step + 1}, ...")
            self.ready[item.step] = item
        self.next_step = first_step + len(self.ready)
        self.started: tuple[int, dict] | None = None  # the rollout under way, and the state before it
        self.error: BaseException | None = None
        self.stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="grpo_lab-rollout-ahead", daemon=True)

    def start(self) -> "RolloutAhead":
        self._thread.start()
        return self

    # ------------------------------------------------------------------ the trainer's side
    def publish(self, version: int) -> None:
        """The engines serve ``version`` now: rollouts up to ``version + k`` may start."""
        with self._cond:
            self.version = version
            self._cond.notify_all()

    def take(self, step: int) -> tuple[Collected, float]:
        """The rollout of ``step`` and the seconds spent waiting for it; the rollout
        thread's error is raised here. It stays in :meth:`state` until :meth:`done`."""
        t0 = time.perf_counter()
        with self._cond:
            while step not in self.ready:
                if self.error is not None:
                    raise self.error
                if not self._thread.is_alive():
                    raise RolloutFailed(f"the rollout thread stopped before the rollout of step {step}")
                self._cond.wait(0.25)
            item = self.ready[step]
        return item, time.perf_counter() - t0

    def done(self, step: int) -> None:
        """Step ``step`` is trained: its rollout is no longer kept."""
        with self._cond:
            for s in [s for s in self.ready if s <= step]:
                del self.ready[s]

    def state(self, done_step: int, replay_from: int | None = None) -> dict[str, Any]:
        """What a checkpoint of ``done_step`` keeps: ``pending``, the finished rollouts of
        the steps after it (up to ``replay_from``, excluded: a rollout to play again, as
        one a fault-rate stop refused), and the samplers' state before the first rollout
        not kept, which a resumed run plays again from the same draws."""
        with self._cond:
            pending, after = [], done_step + 1
            while after in self.ready and (replay_from is None or after < replay_from):
                pending.append(self.ready[after])
                after += 1
            if after in self.ready:
                before = self.ready[after].state_before
            elif self.started is not None and self.started[0] == after:  # under way, or failed
                before = self.started[1]
            else:  # the thread waits at the bound or is done: it changes nothing now
                before = self.snapshot()
            return {**before, "pending": pending}

    def stop(self, timeout_s: float = 5.0) -> None:
        """No rollout starts after this; the one under way is left to end (its engine
        calls time out when the engines stop)."""
        with self._cond:
            self.stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ the rollout thread
    def _run(self) -> None:
        step = self.next_step
        try:
            while step < self.total_steps:
                with self._cond:
                    while not self.stopping and self.version < step - self.max_staleness:
                        self._cond.wait()
                    if self.stopping:
                        return
                    self.started = (step, self.snapshot())
                t0 = time.perf_counter()
                batch, stats, faults = self.produce(step)
                with self._cond:
                    self.ready[step] = Collected(step, batch, stats, faults, time.perf_counter() - t0, self.started[1])
                    self.started = None
                    self._cond.notify_all()
                step += 1
        except BaseException as err:  # the trainer raises it when it takes this step
            with self._cond:
                if not self.stopping:
                    self.error = err
                    log.debug("the rollout thread failed at step %d", step, exc_info=True)
                self._cond.notify_all()
