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
class _Pending:
    group: int
    members: list[int]  # member indices of one micro-group (one member in continuous mode)
    seed: int
    key: Hashable  # the initial state's anchor


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
    predictor = predictor or LengthPredictor()
    stats = ScheduleStats(stream=stream.stats)
    G = config.group_size
    slots = scheduler.max_inflight or len(seeds) * G
    unit = 1 if scheduler.mode == "continuous" else min(scheduler.micro_group_size or G, G)
    if unit > slots:
        raise ValueError(f"micro_group_size {unit} does not fit in max_inflight={slots} slots")

    # plan: one probe reset per group gives the initial state's key (and member 0's env)
    probes: dict[int, tuple[Env, object]] = {}  # group -> (member 0's env, its first observation or its fault)
    pending: list[_Pending] = []
    instruction = ""
    for i, seed in enumerate(seeds):
        group = first_group_id + i
        env = guard(env_factory())
        try:
            obs: object = env.reset(int(seed))
        except EnvFault as fault:
            obs = fault
        instruction = env.instruction
        probes[group] = (env, obs)
        key = obs.anchor if not isinstance(obs, EnvFault) else ("failed reset", group)
        for start in range(0, G, unit):
            pending.append(_Pending(group, list(range(start, min(start + unit, G))), int(seed), key))

    def next_unit() -> int:
        """Index in ``pending`` of the unit that gets the next free slots."""
        if scheduler.order == "fifo" or len(pending) == 1:
            return 0
        guesses = [predictor.predict(p.key) for p in pending]
        known = [g for g in guesses if g is not None]
        fill = sum(known) / len(known) if known else 0.0
        sign = 1.0 if scheduler.order == "shortest_first" else -1.0
        return min(range(len(pending)), key=lambda k: (sign * (guesses[k] if guesses[k] is not None else fill), k))

    running: dict[int, Episode] = {}  # traj_id -> episode
    keys: dict[int, Hashable] = {}  # traj_id -> its initial key
    tokens: dict[int, int] = defaultdict(int)  # traj_id -> generated tokens so far
    prompts: dict[int, list[int]] = {}
    rows: list[Row] = []
    failed: dict[int, int] = {}  # traj_id -> group of the failed episodes
    futures: dict[Future, tuple[Episode, object]] = {}
    pool = ThreadPoolExecutor(scheduler.env_workers) if scheduler.env_workers > 0 else None

    def admit() -> None:
        if scheduler.mode == "micro" and running:
            return  # a round runs to its end
        while pending:
            k = next_unit()
            if len(pending[k].members) > slots - len(running):
                break
            item = pending.pop(k)
            for member in item.members:
                if member == 0 and item.group in probes:
                    env, obs = probes.pop(item.group)
                    ep = Episode(env, item.group, item.group * G, None, item.seed)
                    faults.episodes += 1
                    if isinstance(obs, EnvFault):
                        fail(ep, obs, faults)
                    else:
                        ep.obs = obs
                else:
                    ep = new_episode(env_factory, item.group, member, G, item.seed, faults)
                stats.admissions.append(ep.traj_id)
                if ep.fault is not None:
                    end_failed(ep)
                    continue
                running[ep.traj_id] = ep
                keys[ep.traj_id] = item.key
                submit(ep)
        stats.max_running_episodes = max(stats.max_running_episodes, len(running))

    def end_failed(ep: Episode) -> None:
        failed[ep.traj_id] = ep.group_id
        running.pop(ep.traj_id, None)
        keys.pop(ep.traj_id, None)
        tokens.pop(ep.traj_id, None)
        close_env(ep.env)

    def submit(ep: Episode) -> None:
        prompt = episode_prompt(ep, encoder, instruction, config, faults)
        if prompt is None:
            end_failed(ep)
            return
        prompts[ep.traj_id] = prompt
        stream.submit(ep.traj_id, prompt, config.params_for(ep.traj_id, ep.steps, len(prompt)))

    def env_step(ep: Episode, text: str):
        start = time.perf_counter()
        outcome = guarded_act(ep, text)
        return outcome, time.perf_counter() - start

    def after_env(ep: Episode, comp, outcome, seconds: float) -> None:
        stats.env_seconds += seconds
        if isinstance(outcome, EnvFault):
            prompts.pop(ep.traj_id, None)
            fail(ep, outcome, faults)
            end_failed(ep)
            return
        rows.append(finish_turn(ep, prompts.pop(ep.traj_id), comp, outcome, config, encoder, faults))
        if ep.done:
            del running[ep.traj_id]
            predictor.observe(keys.pop(ep.traj_id), tokens.pop(ep.traj_id))
            close_env(ep.env)
        else:
            submit(ep)

    try:
        admit()
        while running or pending:
            if stream.num_unfinished():
                for traj_id, comp in stream.step():
                    ep = running[traj_id]
                    tokens[traj_id] += len(comp.token_ids)
                    text = completion_text(comp, encoder)
                    if pool is None:
                        after_env(ep, comp, *env_step(ep, text))
                    else:
                        futures[pool.submit(env_step, ep, text)] = (ep, comp)
            elif futures:
                wait(list(futures), return_when=FIRST_COMPLETED)
            elif not running and pending:
                pass  # a round ended: admit below
            elif running:
                raise RuntimeError("scheduler stalled: episodes are running but nothing is in flight")
            for fut in [f for f in futures if f.done()]:
                ep, comp = futures.pop(fut)
                after_env(ep, comp, *fut.result())
            admit()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for ep in running.values():
            close_env(ep.env)
        for env, _ in probes.values():
            close_env(env)
    stats.wall_seconds = time.perf_counter() - t0
    return rows_to_batch(drop_failed(rows, failed, faults, min(2, G))), stats
