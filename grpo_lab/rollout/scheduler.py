"""Episode schedulers: micro sampling groups, continuous refill, length-aware order, and
environment steps that overlap generation.

After *Infinite Sampling* (Wang et al., 2025, "Infinite Sampling: Efficient and Stable
Grouped RL Training for Large Language Models"): a group of ``G`` episodes need not be
generated at once. Episodes hold one of ``max_inflight`` slots while they run (the
memory budget of the engine), and the scheduler decides which episode gets a free slot.

- ``micro``: micro sampling groups. A group is cut into micro-groups of
  ``micro_group_size`` members; a round admits as many whole micro-groups as fit in the
  slots and the next round starts when every episode of the round has ended.
- ``continuous``: continuous sampling. A slot is refilled with the next pending episode
  as soon as its episode ends, so no slot idles while the round's slowest member runs.
- ``order``: ``fifo`` (groups in order), or length-aware ``shortest_first`` /
  ``longest_first`` by a :class:`LengthPredictor`.
- ``env_workers > 0``: environment steps run in a thread pool while the engine keeps
  generating for the other episodes (an environment that waits on I/O, a tool, a
  sandbox or a web page no longer stalls every other episode).

Departures from the paper: Infinite Sampling schedules single-turn answers and plans
micro-groups with a two-stage (FPTAS + shortest-job-first) solver from lengths predicted
on a generated prefix. Here the unit is a multi-turn episode, the plan is greedy (the
free slot goes to the best pending episode under ``order``), and an episode's length is
predicted from the episodes already finished from the same initial state (the same
group earlier in this step, or the same start in earlier steps).

With a deterministic backend (greedy decoding, or per-request seeds:
``AgentLoopConfig.request_seed``) every mode returns exactly the episodes that the plain
lock-step :func:`~grpo_lab.rollout.agent_loop.run_episodes` returns; only the order of
work differs. ``tests/test_scheduler.py`` checks that.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

from ..data import RolloutBatch
from ..envs.base import Env
from .agent_loop import AgentLoopConfig, episode_prompt, finish_turn
from .episode import Episode, Row, close_env, completion_text, fail, guarded_act, new_episode, rows_to_batch
from .backend import RequestStream, StreamStats
from .env_pool import EnvFault, guard
from .faults import FaultLog, drop_failed
from .prompts import PromptEncoder

SCHEDULER_MODES = ("micro", "continuous")
ORDERS = ("fifo", "shortest_first", "longest_first")


@dataclass
class SchedulerConfig:
    """How episodes share the engine (see the module docstring).

    ``max_inflight``: slots, i.e. episodes running at once (``None``: all episodes of the
    call). ``micro_group_size``: members of one group admitted together in ``micro`` mode
    (``None``: the whole group). ``env_workers``: threads for environment steps (0:
    inline)."""

    mode: str = "continuous"
    max_inflight: int | None = None
    micro_group_size: int | None = None
    order: str = "fifo"
    env_workers: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULER_MODES:
            raise ValueError(f"scheduler mode {self.mode!r} is not one of {list(SCHEDULER_MODES)}")
        if self.order not in ORDERS:
            raise ValueError(f"scheduler order {self.order!r} is not one of {list(ORDERS)}")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"max_inflight must be None or >= 1, got {self.max_inflight}")
        if self.micro_group_size is not None and self.micro_group_size < 1:
            raise ValueError(f"micro_group_size must be None or >= 1, got {self.micro_group_size}")
        if self.env_workers < 0:
            raise ValueError(f"env_workers must be >= 0, got {self.env_workers}")


class LengthPredictor:
    """Predicts an episode's generated tokens from earlier episodes with the same initial
    state (keyed by the initial observation's anchor): their mean; for a start never seen,
    the mean over all starts seen (``None`` before any episode ended)."""

    def __init__(self) -> None:
        self._sum: dict[Hashable, float] = defaultdict(float)
        self._count: dict[Hashable, int] = defaultdict(int)
        self._total, self._n = 0.0, 0

    def observe(self, key: Hashable, tokens: int) -> None:
        self._sum[key] += tokens
        self._count[key] += 1
        self._total += tokens
        self._n += 1

    def predict(self, key: Hashable) -> float | None:
        if self._count.get(key):
            return self._sum[key] / self._count[key]
        return self._total / self._n if self._n else None


@dataclass
class ScheduleStats:
    """What one scheduled rollout did: the engine's :class:`StreamStats`, wall-clock
    seconds, seconds spent inside environment steps, and the most episodes running at
    once."""

    stream: StreamStats
    wall_seconds: float = 0.0
    env_seconds: float = 0.0
    max_running_episodes: int = 0
    admissions: list[int] = field(default_factory=list)  # trajectory ids in admission order


@dataclass
class PendingUnit:
    """Members of one group waiting for slots together (one micro-group; one member in
    continuous mode)."""

    group: int
    members: list[int]  # member indices within the group
    seed: int
    key: Hashable  # the initial state's anchor (what the length predictor keys on)


def run_scheduled(
    stream: RequestStream,
    encoder: PromptEncoder,
    env_factory: Callable[[], Env],
    seeds: Sequence[int],
    config: AgentLoopConfig,
    scheduler: SchedulerConfig,
    first_group_id: int = 0,
    predictor: LengthPredictor | None = None,
    faults: FaultLog | None = None,
) -> tuple[RolloutBatch, ScheduleStats]:
    """Play ``config.group_size`` episodes from each seed, as ``run_episodes`` does, under
    ``scheduler``. Returns the batch (same ids and row order as ``run_episodes``) and
    what the schedule cost. ``predictor`` learns from every finished episode (pass the
    same one across calls to predict from earlier steps). A failed episode frees its slot
    at once; it leaves the batch as in ``run_episodes`` and is counted in ``faults``."""
    t0 = time.perf_counter()
    faults = faults if faults is not None else FaultLog()
    rollout = ScheduledRollout(stream, encoder, env_factory, config, scheduler, predictor or LengthPredictor(), faults)
    rollout.plan(seeds, first_group_id)
    rows = rollout.run()
    rollout.stats.wall_seconds = time.perf_counter() - t0
    return rows_to_batch(drop_failed(rows, rollout.failed, faults, min(2, config.group_size))), rollout.stats


class ScheduledRollout:
    """One scheduled rollout (:func:`run_scheduled`): units wait in ``pending`` until
    enough of the ``slots`` are free; an admitted episode runs until it ends or fails,
    one turn per completion the stream returns, its environment step run in a thread pool
    when ``scheduler.env_workers > 0``."""

    def __init__(self, stream: RequestStream, encoder: PromptEncoder, env_factory: Callable[[], Env],
                 config: AgentLoopConfig, scheduler: SchedulerConfig, predictor: LengthPredictor,
                 faults: FaultLog) -> None:
        self.stream, self.encoder, self.env_factory = stream, encoder, env_factory
        self.config, self.scheduler, self.predictor, self.faults = config, scheduler, predictor, faults
        self.stats = ScheduleStats(stream=stream.stats)
        self.pending: list[PendingUnit] = []
        self.probes: dict[int, tuple[Env, object]] = {}  # group -> (member 0's env, its first observation or fault)
        self.slots = 0
        self.running: dict[int, Episode] = {}  # traj_id -> episode
        self.keys: dict[int, Hashable] = {}  # traj_id -> its initial state's key
        self.tokens: dict[int, int] = defaultdict(int)  # traj_id -> tokens generated so far
        self.prompts: dict[int, list[int]] = {}  # traj_id -> the prompt of its turn in flight
        self.rows: list[Row] = []
        self.failed: dict[int, int] = {}  # traj_id -> group, of the failed episodes

    def plan(self, seeds: Sequence[int], first_group_id: int) -> None:
        """The units to admit: one probe reset per group gives the initial state's key
        (and member 0's environment)."""
        G, scheduler = self.config.group_size, self.scheduler
        self.slots = scheduler.max_inflight or len(seeds) * G
        unit = 1 if scheduler.mode == "continuous" else min(scheduler.micro_group_size or G, G)
        if unit > self.slots:
            raise ValueError(f"micro_group_size {unit} does not fit in max_inflight={self.slots} slots")
        try:
            for i, seed in enumerate(seeds):
                group = first_group_id + i
                env = guard(self.env_factory())
                self.probes[group] = (env, None)
                try:
                    obs: object = env.reset(int(seed))
                except EnvFault as fault:
                    obs = fault
                self.probes[group] = (env, obs)
                key = obs.anchor if not isinstance(obs, EnvFault) else ("failed reset", group)
                for start in range(0, G, unit):
                    self.pending.append(PendingUnit(group, list(range(start, min(start + unit, G))), int(seed), key))
        except BaseException:  # an environment that cannot be built: close the ones that were
            for env, _ in self.probes.values():
                close_env(env)
            raise

    def run(self) -> list[Row]:
        """Admit, generate, step the environments and refill until every episode ended;
        returns the rows in the order their turns finished."""
        stream = self.stream
        workers = self.scheduler.env_workers
        pool = ThreadPoolExecutor(workers) if workers > 0 else None
        futures: dict[Future, tuple[Episode, object]] = {}
        try:
            self.admit()
            while self.running or self.pending:
                if stream.num_unfinished():
                    for traj_id, comp in stream.step():
                        ep = self.running[traj_id]
                        self.tokens[traj_id] += len(comp.token_ids)
                        text = completion_text(comp, self.encoder)
                        if pool is None:
                            self.after_env(ep, comp, *env_step(ep, text))
                        else:
                            futures[pool.submit(env_step, ep, text)] = (ep, comp)
                elif futures:
                    wait(list(futures), return_when=FIRST_COMPLETED)
                elif not self.running and self.pending:
                    pass  # a round ended: admit below
                elif self.running:
                    raise RuntimeError("scheduler stalled: episodes are running but nothing is in flight")
                for fut in [f for f in futures if f.done()]:
                    ep, comp = futures.pop(fut)
                    self.after_env(ep, comp, *fut.result())
                self.admit()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            for ep in self.running.values():
                close_env(ep.env)
            for env, _ in self.probes.values():
                close_env(env)
        return self.rows

    def next_unit(self) -> int:
        """Index in ``pending`` of the unit that gets the next free slots."""
        pending, order = self.pending, self.scheduler.order
        if order == "fifo" or len(pending) == 1:
            return 0
        guesses = [self.predictor.predict(p.key) for p in pending]
        known = [g for g in guesses if g is not None]
        fill = sum(known) / len(known) if known else 0.0
        sign = 1.0 if order == "shortest_first" else -1.0
        return min(range(len(pending)), key=lambda k: (sign * (guesses[k] if guesses[k] is not None else fill), k))

    def admit(self) -> None:
        """Start the pending units that fit in the free slots (in ``micro`` mode only
        when the round has ended) and submit their first prompts."""
        if self.scheduler.mode == "micro" and self.running:
            return  # a round runs to its end
        G = self.config.group_size
        while self.pending:
            k = self.next_unit()
            if len(self.pending[k].members) > self.slots - len(self.running):
                break
            item = self.pending.pop(k)
            for member in item.members:
                if member == 0 and item.group in self.probes:
                    env, obs = self.probes.pop(item.group)
                    ep = Episode(env, item.group, item.group * G, None, item.seed)
                    self.faults.episodes += 1
                    if isinstance(obs, EnvFault):
                        fail(ep, obs, self.faults)
                    else:
                        ep.obs = obs
                else:
                    ep = new_episode(self.env_factory, item.group, member, G, item.seed, self.faults)
                self.stats.admissions.append(ep.traj_id)
                if ep.fault is not None:
                    self.end_failed(ep)
                    continue
                self.running[ep.traj_id] = ep
                self.keys[ep.traj_id] = item.key
                self.submit(ep)
        self.stats.max_running_episodes = max(self.stats.max_running_episodes, len(self.running))

    def submit(self, ep: Episode) -> None:
        """Send the episode's next prompt to the stream (a prompt that cannot be built
        fails the episode)."""
        prompt = episode_prompt(ep, self.encoder, self.config, self.faults)
        if prompt is None:
            self.end_failed(ep)
            return
        self.prompts[ep.traj_id] = prompt
        self.stream.submit(ep.traj_id, prompt, self.config.params_for(ep.traj_id, ep.steps, len(prompt)))

    def after_env(self, ep: Episode, comp, outcome, seconds: float) -> None:
        """The turn's row once the environment has stepped; the episode then ends (its
        length taught to the predictor) or submits its next prompt."""
        self.stats.env_seconds += seconds
        if isinstance(outcome, EnvFault):
            self.prompts.pop(ep.traj_id, None)
            fail(ep, outcome, self.faults)
            self.end_failed(ep)
            return
        self.rows.append(finish_turn(ep, self.prompts.pop(ep.traj_id), comp, outcome, self.config, self.encoder,
                                     self.faults))
        if ep.done:
            del self.running[ep.traj_id]
            self.predictor.observe(self.keys.pop(ep.traj_id), self.tokens.pop(ep.traj_id))
            close_env(ep.env)
        else:
            self.submit(ep)

    def end_failed(self, ep: Episode) -> None:
        """A failed episode leaves its slot and closes its environment."""
        self.failed[ep.traj_id] = ep.group_id
        self.running.pop(ep.traj_id, None)
        self.keys.pop(ep.traj_id, None)
        self.tokens.pop(ep.traj_id, None)
        close_env(ep.env)


def env_step(ep: Episode, text: str) -> tuple[object, float]:
    """The environment's step on the answer ``text`` (a fault caught as the outcome), and
    the seconds it took."""
    start = time.perf_counter()
    outcome = guarded_act(ep, text)
    return outcome, time.perf_counter() - start
