"""Training the agents users already wrote: ``env=agent``.

An agent is a function ``async def run(task: dict, ctx) -> float`` (or a plain ``def``,
run in a thread of its own) that talks to the policy through the OpenAI API:
``ctx.client`` is an ``openai.AsyncOpenAI`` bound to this episode (``ctx.sync_client``
an ``openai.OpenAI``), and ``ctx.base_url``, ``ctx.api_key`` and ``ctx.model`` serve any
other client (LangChain's ``ChatOpenAI(base_url=..., api_key=..., model=...)``). It
returns the episode's reward; ``ctx.reward(x)`` adds a reward to its latest call and
``ctx.anchor(key)`` names the environment state of its latest call (GiGPO's step groups).

    python -m grpo_lab.train env=agent env.kwargs.entry=my_agent:run env.kwargs.tasks=tasks.jsonl

Tasks are the rows of anything ``datasets`` loads (as ``env=dataset``); ``entry`` is
``module:function``, found as reward functions are. Each step, the ``algo.group_size``
episodes of each task run concurrently against an endpoint started for the rollout
(:mod:`grpo_lab.endpoint.server`) on the run's backend; every call an episode makes is one
row (:mod:`grpo_lab.endpoint.chat`), the episode's reward goes to its last call, and the
episode is won when that reward reaches ``success_threshold``.

Faults follow the environments' contract: an agent that raises, runs past
``episode_timeout_s``, makes no call, or returns a reward that is not a finite number
loses its episode, which is counted and logged with the task and the first line of the
error (a call that takes longer than ``call_timeout_s`` raises inside the agent). A plain
``def`` agent past its timeout cannot be stopped: its thread is abandoned and its key
refused from then on.

Departures, stated: the answers are sampled at ``rollout.temperature`` and
``rollout.top_p`` whatever an agent asks (the trainer's log-probs are taken at these);
per-request seeds (``rollout.request_seeds``) do not apply; evaluation plays the same
agent on the evaluation seeds.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from ..data import RolloutBatch
from ..envs.base import Observation, StepResult, TextFormat
from ..envs.dataset import load_rows
from ..envs.rewards import import_callable
from ..envs.worker import first_line
from ..rollout.env_pool import EnvFault
from ..rollout.episode import Row, rows_to_batch
from ..rollout.faults import FaultLog, drop_failed
from .app import ServeSettings
from .chat import EpisodeCapture
from .server import Endpoint


@dataclass
class AgentContext:
    """What an agent function gets besides its task: a client bound to its episode, the
    endpoint's address and key, and ways to attach a reward or an anchor to its latest
    call."""

    base_url: str
    api_key: str
    model: str
    task: dict
    timeout_s: float | None
    capture: EpisodeCapture = field(repr=False)
    _clients: list = field(default_factory=list, repr=False)

    @property
    def client(self):
        """An ``openai.AsyncOpenAI`` bound to this episode."""
        import openai

        return self._bound(openai.AsyncOpenAI)

    @property
    def sync_client(self):
        """An ``openai.OpenAI`` bound to this episode (for a plain ``def`` agent)."""
        import openai

        return self._bound(openai.OpenAI)

    def _bound(self, kind: type):
        """The episode's client of ``kind``, made at first use (no retries: a failed call
        is the agent's to handle)."""
        for client in self._clients:
            if isinstance(client, kind):
                return client
        client = kind(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)
        self._clients.append(client)
        return client

    def _latest(self, what: str):
        if not self.capture.calls:
            raise RuntimeError(f"ctx.{what}: the agent has not called the model yet")
        return self.capture.calls[-1]

    def reward(self, value: float) -> None:
        """Add ``value`` to the reward of the latest call (a step reward)."""
        value = float(value)
        if not math.isfinite(value):
            raise NonFiniteReward(f"ctx.reward({value}): not a finite number")
        self._latest("reward").reward += value

    def anchor(self, key: Hashable) -> None:
        """The environment state the latest call was made in (equal keys: equal states)."""
        hash(key)
        self._latest("anchor").anchor = key

    async def aclose(self) -> None:
        for client in self._clients:
            result = client.close()
            if inspect.isawaitable(result):
                await result


class NonFiniteReward(ValueError):
    """A reward that is a number but not a finite one (the fault kind ``nonfinite``)."""


def agent_reward(value: Any) -> float:
    """An agent's return value as the episode's reward; ``ValueError`` when it is not a
    finite number."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(f"the agent returned {value!r} ({type(value).__name__}), not a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise NonFiniteReward(f"the agent returned {reward}, not a finite number")
    return reward


class AgentTasks:
    """The tasks of a user's agent (``env=agent``): rows of a dataset, each played by the
    agent function ``entry`` (module docstring). ``reset(seed)`` gives row
    ``seed % len(rows)`` as JSON; the episodes are not played turn by turn here but by
    :class:`AgentPlayer`, which the run uses in place of the turn loop."""

    text_format = TextFormat(tags=(), framed=False)
    instruction = ""

    def __init__(self, entry: str | None = None, tasks: str | None = None, split: str = "train",
                 config_name: str | None = None, data_files: Sequence[str] | None = None,
                 success_threshold: float = 1.0, call_timeout_s: float = 120.0,
                 episode_timeout_s: float = 600.0) -> None:
        if not entry:
            raise ValueError("env=agent needs env.kwargs.entry: the agent function, 'module:function'")
        if not tasks:
            raise ValueError("env=agent needs env.kwargs.tasks: its tasks, a data file (.jsonl/.json/.csv/.parquet), "
                             "a dataset directory or a hub dataset")
        for name, value in (("call_timeout_s", call_timeout_s), ("episode_timeout_s", episode_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.entry = entry
        self.agent = import_callable(entry, "agent")
        self.rows = load_rows(str(tasks), split, config_name, tuple(data_files) if data_files else None)
        self.success_threshold = float(success_threshold)
        self.call_timeout_s, self.episode_timeout_s = float(call_timeout_s), float(episode_timeout_s)

    def task(self, seed: int) -> tuple[int, dict]:
        index = int(seed) % len(self.rows)
        return index, dict(self.rows[index])

    def reset(self, seed: int) -> Observation:
        index, row = self.task(seed)
        return Observation(json.dumps(row, default=str), ("task", index))

    def step(self, action: str) -> StepResult:
        raise RuntimeError("agent tasks are played by their agent function, not turn by turn")

    def legal_actions(self) -> list[str]:
        return []  # nothing to demonstrate: the format warm-up is skipped

    def close(self) -> None:
        pass

    def episode_player(self, backend, tokenizer, settings: ServeSettings, host: str = "127.0.0.1",
                       tool_parser: str = "hermes") -> "AgentPlayer":
        """What plays these tasks' episodes in place of the turn loop."""
        return AgentPlayer(self, backend, tokenizer, settings, host, tool_parser)


class AgentPlayer:
    """Plays agent episodes: an endpoint on the run's backend for the duration of one
    call, ``group_size`` concurrent episodes per seed, each call a row."""

    def __init__(self, tasks: AgentTasks, backend, tokenizer, settings: ServeSettings, host: str = "127.0.0.1",
                 tool_parser: str = "hermes") -> None:
        self.tasks, self.backend, self.tokenizer, self.settings = tasks, backend, tokenizer, settings
        self.host, self.tool_parser = host, tool_parser

    def __call__(self, seeds: Sequence[int], group_size: int, first_group_id: int, faults: FaultLog
                 ) -> tuple[RolloutBatch, dict[str, float]]:
        """The episodes, failed ones dropped (and groups left with fewer than two), and
        what the rollout cost."""
        t0 = time.perf_counter()
        endpoint = Endpoint.start(self.backend, self.tokenizer, self.settings, host=self.host,
                                  tool_parser=self.tool_parser)
        try:
            episodes = asyncio.run(self.play_all(endpoint, seeds, group_size, first_group_id, faults))
        finally:
            endpoint.stop()
        rows, failed = [], {}
        for group, traj, reward, capture, fault in episodes:
            if fault is not None:
                failed[traj] = group
                continue
            rows.extend(episode_rows(capture, group, traj, reward, self.tasks.success_threshold))
        calls = sum(len(c.calls) for _, _, _, c, _ in episodes)
        stats = {"agent_calls": float(calls),
                 "agent_calls_extending": sum(x.extends for _, _, _, c, _ in episodes for x in c.calls) / max(calls, 1),
                 "agent_template_rewrites": float(sum(c.template_rewrites for _, _, _, c, _ in episodes)),
                 "agent_malformed_tool_calls": float(endpoint.stats.malformed_tool_calls),
                 "agent_rollout_seconds": time.perf_counter() - t0}
        return rows_to_batch(drop_failed(rows, failed, faults, min(2, group_size))), stats

    async def play_all(self, endpoint: Endpoint, seeds: Sequence[int], group_size: int, first_group_id: int,
                       faults: FaultLog) -> list[tuple[int, int, float, EpisodeCapture, EnvFault | None]]:
        sync = not inspect.iscoroutinefunction(self.tasks.agent)
        threads = ThreadPoolExecutor(max_workers=len(seeds) * group_size) if sync else None
        try:
            jobs = [self.play(endpoint, seed, first_group_id + i, (first_group_id + i) * group_size + member, faults,
                              threads)
                    for i, seed in enumerate(seeds) for member in range(group_size)]
            return list(await asyncio.gather(*jobs))
        finally:
            if threads is not None:
                threads.shutdown(wait=False, cancel_futures=True)

    async def play(self, endpoint: Endpoint, seed: int, group: int, traj: int, faults: FaultLog,
                   threads: ThreadPoolExecutor | None) -> tuple[int, int, float, EpisodeCapture, EnvFault | None]:
        """One episode: ``(group, traj, reward, its calls, its fault or None)``."""
        index, task = self.tasks.task(seed)
        key = endpoint.sessions.open()
        capture = endpoint.sessions.capture_of(key)
        ctx = AgentContext(endpoint.base_url, key, self.settings.model, task, self.tasks.call_timeout_s, capture)
        faults.episodes += 1
        fault, reward = None, math.nan
        try:
            if threads is None:
                result = await asyncio.wait_for(self.tasks.agent(task, ctx), self.tasks.episode_timeout_s)
            else:
                loop = asyncio.get_running_loop()
                result = await asyncio.wait_for(loop.run_in_executor(threads, self.tasks.agent, task, ctx),
                                                self.tasks.episode_timeout_s)
            reward = agent_reward(result)
            if not capture.calls:
                raise ValueError("the agent made no call to the model")
        except asyncio.TimeoutError:
            fault = EnvFault("timeout", f"agent {self.tasks.entry}", index, len(capture.calls),
                             f"the episode ran past episode_timeout_s={self.tasks.episode_timeout_s:g}")
        except Exception as err:
            kind = "nonfinite" if isinstance(err, NonFiniteReward) else "error"
            fault = EnvFault(kind, f"agent {self.tasks.entry}", index, len(capture.calls), first_line(err))
        finally:
            endpoint.sessions.close(key)
            await ctx.aclose()
        if fault is not None:
            faults.record(fault)
        return group, traj, reward, capture, fault


def episode_rows(capture: EpisodeCapture, group: int, traj: int, reward: float, success_threshold: float) -> list[Row]:
    """One row per call: its prompt and sampled ids and log-probs, the reward attached to
    it (the episode's reward added on the main agent's last call: role 0's, the last call
    when there is no role-0 call), the last one done, won when the episode's reward
    reaches ``success_threshold``; a call without an anchor gets one of its own. Each row
    keeps its call's role and invocation (a multi-agent system addressing roles by
    ``model``)."""
    rows = []
    last = len(capture.calls) - 1
    paid = max((k for k, c in enumerate(capture.calls) if c.role == 0), default=last)
    for step, call in enumerate(capture.calls):
        done = step == last
        rows.append(Row(group, traj, step, list(call.prompt_ids), list(call.completion.token_ids),
                        list(call.completion.logprobs), call.reward + (reward if step == paid else 0.0), done, True,
                        done and reward >= success_threshold,
                        call.anchor if call.anchor is not None else ("agent call", traj, step),
                        version=call.completion.version, truncated=call.completion.finish_reason == "length",
                        role=call.role, invocation=call.invocation))
    return rows


AgentFunction = Callable[[dict, AgentContext], Any]
