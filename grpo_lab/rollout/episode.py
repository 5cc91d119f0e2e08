"""One episode of an agent and the rows it leaves: the state a turn step advances, and
the pieces of a turn that touch the environment.

An :class:`Episode` holds an environment, its observation, the turns so far and (for
conversation episodes) the next prompt's tokens; every turn becomes one :class:`Row`
(prompt ids, sampled ids with their log-probs, the step's reward and flags), and
:func:`rows_to_batch` makes a :class:`~grpo_lab.data.RolloutBatch` of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from ..data import RolloutBatch
from ..envs.base import Env, Observation, StepResult, text_format_of
from .backend import Completion
from .env_pool import EnvFault, guard
from .faults import FaultLog
from .prompts import PromptEncoder, Turn


@dataclass
class Episode:
    """An episode being played: its environment, observation, past turns and step count."""

    env: Env
    group_id: int
    traj_id: int
    obs: Observation | None  # None: the reset failed
    seed: int = 0
    history: list[Turn] = field(default_factory=list)
    steps: int = 0
    done: bool = False
    fault: EnvFault | None = None  # set when the episode failed: it leaves the batch
    ids: list[int] | None = None  # conversation episodes: the next prompt's tokens (the whole conversation)


@dataclass
class Row:
    """One turn's row of the batch (tree rows carry their node ids)."""

    group_id: int
    traj_id: int
    step: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    reward: float
    done: bool
    valid: bool
    won: bool
    anchor: Hashable
    tree_id: int = -1
    node_id: int = -1
    parent_id: int = -1
    reward_parts: dict[str, float] | None = None  # the reward functions' own values (StepResult.info["rewards"])
    version: int | None = None  # the policy version that sampled the response (None: not reported)
    truncated: bool = False  # the response stopped at the token budget (finish_reason "length")
    role: int = 0  # the acting role of a multi-agent episode (0: the main agent)
    invocation: int = -1  # a sub-agent's invocation within the episode (-1: the main agent)


#: the prefix of an environment's own figures among a row's named parts
ENV_METRIC_PREFIX = "env/"


def reward_parts(result: StepResult | None) -> dict[str, float] | None:
    """The named parts of a step's reward (``info["rewards"]``, as the dataset
    environment's reward functions report them) and the environment's own figures of the
    step (``info["metrics"]``, e.g. search_qa's searches, named ``env/<name>``), or ``None``."""
    if result is None:
        return None
    out = {}
    for source, prefix in (("rewards", ""), ("metrics", ENV_METRIC_PREFIX)):
        parts = result.info.get(source)
        if isinstance(parts, dict):
            out.update({prefix + str(k): float(v) for k, v in parts.items()})
    return out or None


def new_episode(env_factory: Callable[[], Env], group: int, member: int, group_size: int, seed: int,
                 faults: FaultLog | None = None) -> Episode:
    """A new episode, reset from ``seed``; a failed reset gives a failed episode."""
    env = guard(env_factory())
    ep = Episode(env, group, group * group_size + member, None, int(seed))
    if faults is not None:
        faults.episodes += 1
    try:
        ep.obs = env.reset(int(seed))
    except EnvFault as fault:
        fail(ep, fault, faults)
    return ep


def fail(ep: Episode, fault: EnvFault, faults: FaultLog | None) -> None:
    """End ``ep`` as failed (it will leave the batch) and count the fault."""
    ep.fault, ep.done = fault, True
    if faults is not None:
        faults.record(fault)


def close_env(env: Env) -> None:
    """Release an environment that has an ``close`` method (worker proxies, gymnasium)."""
    close = getattr(env, "close", None)
    if callable(close):
        close()


def env_name(env: Env) -> str:
    return getattr(env, "name", type(env).__name__)


def completion_text(comp: Completion, encoder: PromptEncoder) -> str:
    return comp.text or encoder.tokenizer.decode(comp.token_ids, skip_special_tokens=True)


def act(env: Env, text: str) -> tuple[str | None, StepResult | None]:
    """Parse the action from an answer (in the environment's text format) and step the
    environment with it (no step when there is no parseable action). The only part of a
    turn that touches the environment, so a scheduler may run it in a worker thread."""
    action = text_format_of(env).parse(text)
    return action, (env.step(action) if action is not None else None)


def guarded_act(ep: Episode, text: str) -> tuple[str | None, StepResult | None] | EnvFault:
    """:func:`act` on the episode's environment, its fault returned instead of raised."""
    try:
        return act(ep.env, text)
    except EnvFault as fault:
        return fault


def turn_outcome(result: StepResult | None, obs: Observation) -> tuple[float, bool, bool, bool, Observation]:
    """``(reward, env_done, valid, won, next_obs)`` of a turn from its step result; an
    answer without a parseable action (``result is None``) is invalid and leaves the
    state at ``obs``."""
    if result is None:
        return 0.0, False, False, False, obs
    info = result.info
    return result.reward, result.done, bool(info.get("valid_action", True)), bool(info.get("won", False)), result.observation


def rows_to_batch(rows: list[Row], order: Callable[[Row], tuple] = lambda r: (r.traj_id, r.step)) -> RolloutBatch:
    """The rows as a batch, sorted by ``order`` (default: grouped by trajectory, in step
    order)."""
    rows.sort(key=order)
    return RolloutBatch(
        group_id=[r.group_id for r in rows],
        traj_id=[r.traj_id for r in rows],
        step=[r.step for r in rows],
        prompt_ids=[r.prompt_ids for r in rows],
        response_ids=[r.response_ids for r in rows],
        rollout_logprobs=[r.logprobs for r in rows],
        loss_mask=[torch.ones(len(r.response_ids)) for r in rows],
        reward=[r.reward for r in rows],
        done=[r.done for r in rows],
        valid_action=[r.valid for r in rows],
        won=[r.won for r in rows],
        anchor=[r.anchor for r in rows],
        tree_id=[r.tree_id for r in rows],
        node_id=[r.node_id for r in rows],
        parent_id=[r.parent_id for r in rows],
        reward_parts=[r.reward_parts or {} for r in rows],
        policy_version=[-1 if r.version is None else r.version for r in rows],
        truncated=[r.truncated for r in rows],
        role=[r.role for r in rows],
        invocation=[r.invocation for r in rows],
    )
