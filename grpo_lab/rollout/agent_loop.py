"""The multi-turn agent loop: groups of episodes that start from the same seed.

Every turn, the prompts of all running episodes go to the backend in one call; the
action is parsed from each answer, the environment steps, and an episode that ends
leaves the batch at once (it never generates again). Each agent step becomes one row of
a :class:`~grpo_lab.data.RolloutBatch`, with the exact prompt and response tokens.

Two episode formats (``AgentLoopConfig.episode_format``): ``memory`` renders every
turn's prompt from the task, the last ``history_window`` turns and the observation;
``conversation`` keeps one growing token sequence per episode, the sampled ids kept as
they are (:mod:`~grpo_lab.rollout.conversation`). Either way a turn is a row.

Faults cost their episode, not the rollout: an environment that raises, hangs (with
worker processes, :mod:`~grpo_lab.rollout.env_pool`) or returns a non-finite reward ends
its episode, which leaves the batch whole (:mod:`~grpo_lab.rollout.faults`). A prompt
longer than the token limit is never sent: ``overlong`` says whether to drop the oldest
turns of its history window until it fits (memory), end the episode at its last turn
that fitted (conversation), drop the episode, or stop; every request's ``max_tokens`` is
capped so that prompt and answer fit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from ..data import RolloutBatch
from ..envs.base import ACTION_FORMAT, Env, Observation, StepResult, TextFormat, text_format_of
from .backend import Backend, Completion, SamplingParams
from .env_pool import EnvFault, guard
from .faults import FaultLog, drop_failed
from .conversation import EPISODE_FORMATS, first_message, next_message
from .prompts import ACTION_STOP, PromptEncoder, Turn, render_prompt

OVERLONG_POLICIES = ("truncate_history", "end_episode", "drop_episode", "error")
#: the overlong policies each episode format can apply
OVERLONG_BY_FORMAT = {"memory": ("truncate_history", "drop_episode", "error"),
                      "conversation": ("end_episode", "drop_episode", "error")}


class OverlongPromptError(RuntimeError):
    """A prompt longer than the model's context, with ``overlong="error"``."""


@dataclass
class AgentLoopConfig:
    """``group_size`` episodes per seed; at most ``max_steps`` turns per episode; the
    prompt shows the last ``history_window`` turns.

    ``request_seed``: when set, the request of turn ``t`` of trajectory ``j`` samples with
    seed :func:`request_seed_of` ``(request_seed, j, t)``, so an episode does not depend
    on which other requests share its batch (any scheduler gives the same episodes).

    ``max_context``: the model's context in tokens (``None``: unbounded); a prompt must
    leave room for at least one answer token, and each request's ``max_tokens`` is capped
    at the room left. ``overlong``: what happens to a prompt that does not fit
    (:data:`OVERLONG_POLICIES`): ``truncate_history`` shows fewer past turns until it
    fits (the episode is dropped when even the bare observation does not; memory format),
    ``end_episode`` ends a conversation episode at its last turn whose next prompt fits
    (that turn's row is marked done, as at ``max_steps``; conversation format),
    ``drop_episode`` drops the episode, ``error`` raises :class:`OverlongPromptError`.
    ``env_threads``: threads that step a turn's environments at once (0: one after another).

    ``episode_format``: ``memory`` or ``conversation`` (module docstring);
    ``max_episode_tokens`` bounds a conversation's tokens (prompt and answer) below the
    model's context.
    """

    group_size: int = 8
    max_steps: int = 10
    history_window: int = 2
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=16, stop=(ACTION_STOP,)))
    request_seed: int | None = None
    max_context: int | None = None
    overlong: str | None = None  # None: the episode format's default (truncate_history, end_episode)
    env_threads: int = 0
    episode_format: str = "memory"
    max_episode_tokens: int | None = None

    @property
    def token_limit(self) -> int | None:
        """The most tokens a prompt and its answer may hold (``None``: unbounded)."""
        limits = [x for x in (self.max_context, self.max_episode_tokens) if x is not None]
        return min(limits) if limits else None

    def params_for(self, traj_id: int, step: int, prompt_len: int | None = None) -> SamplingParams:
        """The sampling parameters of one request (its seed; ``max_tokens`` capped to the
        context left after a prompt of ``prompt_len`` tokens)."""
        params = self.sampling
        if self.request_seed is not None:
            params = params.with_seed(request_seed_of(self.request_seed, traj_id, step))
        limit = self.token_limit
        if limit is not None and prompt_len is not None and prompt_len + params.max_tokens > limit:
            params = params.with_max_tokens(limit - prompt_len)
        return params

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.history_window < 0:
            raise ValueError(f"history_window must be >= 0, got {self.history_window}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be None or >= 2, got {self.max_context}")
        if self.env_threads < 0:
            raise ValueError(f"env_threads must be >= 0, got {self.env_threads}")
        if self.episode_format not in EPISODE_FORMATS:
            raise ValueError(f"episode_format={self.episode_format!r} is not one of {list(EPISODE_FORMATS)}")
        if self.overlong is None:
            self.overlong = OVERLONG_BY_FORMAT[self.episode_format][0]
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={self.overlong!r} is not one of {list(OVERLONG_POLICIES)}")
        if self.overlong not in OVERLONG_BY_FORMAT[self.episode_format]:
            raise ValueError(f"overlong={self.overlong!r} does not apply to {self.episode_format} episodes: use one of "
                             f"{list(OVERLONG_BY_FORMAT[self.episode_format])}")
        if self.max_episode_tokens is not None and (self.episode_format != "conversation" or self.max_episode_tokens < 2):
            raise ValueError(f"max_episode_tokens={self.max_episode_tokens} needs episode_format=conversation and a "
                             "value >= 2")


def request_seed_of(base: int, traj_id: int, step: int) -> int:
    """A 63-bit seed for one request, mixed from ``(base, traj_id, step)`` (splitmix64)."""
    x = (int(base) * 0x9E3779B97F4A7C15 + int(traj_id) * 0xBF58476D1CE4E5B9 + int(step) * 0x94D049BB133111EB) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) >> 1


@dataclass
class _Episode:
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
class _Row:
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


def reward_parts(result: StepResult | None) -> dict[str, float] | None:
    """The named parts of a step's reward (``info["rewards"]``, as the dataset
    environment's reward functions report them), or ``None``."""
    parts = result.info.get("rewards") if result is not None else None
    return {str(k): float(v) for k, v in parts.items()} if isinstance(parts, dict) and parts else None


def run_episodes(
    backend: Backend,
    encoder: PromptEncoder,
    env_factory: Callable[[], Env],
    seeds: Sequence[int],
    config: AgentLoopConfig,
    first_group_id: int = 0,
    faults: FaultLog | None = None,
) -> RolloutBatch:
    """Play ``config.group_size`` episodes from each seed in ``seeds``.

    Group ``first_group_id + i`` holds the episodes of ``seeds[i]``; trajectory ids are
    ``group * group_size + member``. Rows come out grouped by episode, in step order.

    An answer without a parseable action (``<action>`` tags, or the environment's
    ``text_format``) does not reach the environment: the state
    stays, the step counts toward ``max_steps`` and is marked invalid. An action the
    environment calls illegal is marked invalid too. Failed episodes are left out and
    counted in ``faults`` (module docstring).
    """
    faults = faults if faults is not None else FaultLog()
    episodes = [
        _new_episode(env_factory, first_group_id + i, member, config.group_size, seed, faults)
        for i, seed in enumerate(seeds)
        for member in range(config.group_size)
    ]
    rows: list[_Row] = []
    instruction = episodes[0].env.instruction if episodes else ""
    pool = ThreadPoolExecutor(config.env_threads) if config.env_threads > 0 else None
    try:
        while True:
            running = [ep for ep in episodes if not ep.done]
            prompts = [episode_prompt(ep, encoder, instruction, config, faults) for ep in running]
            running, prompts = [ep for ep, p in zip(running, prompts) if p is not None], [p for p in prompts if p is not None]
            if not running:
                break
            completions = backend.generate(prompts, [config.params_for(ep.traj_id, ep.steps, len(p))
                                                     for ep, p in zip(running, prompts)])
            if len(completions) != len(running):
                raise RuntimeError(f"backend returned {len(completions)} completions for {len(running)} prompts")
            texts = [completion_text(comp, encoder) for comp in completions]
            steps = (pool.map(guarded_act, running, texts) if pool is not None else map(guarded_act, running, texts))
            for ep, prompt, comp, outcome in zip(running, prompts, completions, list(steps)):
                if isinstance(outcome, EnvFault):
                    fail(ep, outcome, faults)
                else:
                    rows.append(finish_turn(ep, prompt, comp, outcome, config, encoder, faults))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for ep in episodes:
            close_env(ep.env)
    failed = {ep.traj_id: ep.group_id for ep in episodes if ep.fault is not None}
    return rows_to_batch(drop_failed(rows, failed, faults, min(2, config.group_size)))


def _new_episode(env_factory: Callable[[], Env], group: int, member: int, group_size: int, seed: int,
                 faults: FaultLog | None = None) -> _Episode:
    """A new episode, reset from ``seed``; a failed reset gives a failed episode."""
    env = guard(env_factory())
    ep = _Episode(env, group, group * group_size + member, None, int(seed))
    if faults is not None:
        faults.episodes += 1
    try:
        ep.obs = env.reset(int(seed))
    except EnvFault as fault:
        fail(ep, fault, faults)
    return ep


def fail(ep: _Episode, fault: EnvFault, faults: FaultLog | None) -> None:
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


def refuse_empty(ids: Sequence[int], where: tuple[str, int | None, int]) -> None:
    """An ``error`` fault for a prompt of no tokens (an empty observation without a chat
    template or instruction around it): no model can answer it."""
    if not ids:
        raise EnvFault("error", *where, "the prompt is empty (the instruction and observation encode to 0 tokens)")


def fit_prompt(
    encoder: PromptEncoder, instruction: str, history: Sequence[Turn], observation: str, config: AgentLoopConfig,
    where: tuple[str, int | None, int], faults: FaultLog | None, fmt: TextFormat = ACTION_FORMAT,
) -> list[int]:
    """Token ids of a prompt that fits ``config.max_context`` (see
    :class:`AgentLoopConfig`); ``where`` is ``(environment, seed, step)`` for the fault or
    error raised when it cannot fit; ``fmt`` is the environment's text format."""
    ids = encoder.encode(render_prompt(instruction, history, observation, config.history_window, fmt))
    refuse_empty(ids, where)
    limit = config.max_context
    if limit is None or len(ids) < limit:
        return ids
    detail = (f"the prompt has {len(ids)} tokens and the model's context is {limit} (showing "
              f"{min(len(history), config.history_window)} past turns)")
    if config.overlong == "error":
        raise OverlongPromptError(f"env {where[0]!r} seed {where[1]} step {where[2]}: {detail}; "
                                  "set rollout.overlong_prompt=truncate_history or drop_episode to go on without it")
    if config.overlong == "truncate_history":
        for window in range(min(len(history), config.history_window) - 1, -1, -1):
            ids = encoder.encode(render_prompt(instruction, history, observation, window, fmt))
            if len(ids) < limit:
                if faults is not None:
                    faults.overlong_truncated += 1
                return ids
        detail += f"; without past turns it still has {len(ids)}"
    raise EnvFault("overlong", *where, detail)


def episode_prompt(ep: _Episode, encoder: PromptEncoder, instruction: str, config: AgentLoopConfig,
                   faults: FaultLog | None = None) -> list[int] | None:
    """Token ids of the episode's next prompt; ``None`` when it cannot fit the context
    (the episode is then failed and counted)."""
    try:
        if config.episode_format == "conversation":
            return conversation_prompt(ep, encoder, instruction, config)
        return fit_prompt(encoder, instruction, ep.history, ep.obs.text, config, (env_name(ep.env), ep.seed, ep.steps), faults,
                          text_format_of(ep.env))
    except EnvFault as fault:
        fail(ep, fault, faults)
        return None


def conversation_prompt(ep: _Episode, encoder: PromptEncoder, instruction: str, config: AgentLoopConfig) -> list[int]:
    """The episode's conversation so far (:func:`fit_conversation`), kept on the episode."""
    ep.ids = fit_conversation(encoder, instruction, ep.ids, ep.obs.text, config, (env_name(ep.env), ep.seed, ep.steps))
    return ep.ids


def fit_conversation(encoder: PromptEncoder, instruction: str, ids: Sequence[int] | None, observation: str,
                     config: AgentLoopConfig, where: tuple[str, int | None, int]) -> list[int]:
    """The next prompt of a conversation episode: ``ids`` (the conversation so far), or at
    its first turn (``ids`` None) the first prompt of the task and ``observation``. Raises
    :class:`OverlongPromptError` (``overlong="error"``) or the ``overlong`` fault when it
    leaves no room for an answer; ``where`` is ``(environment, seed, step)``."""
    ids = list(ids) if ids is not None else encoder.conversation.start(first_message(instruction, observation))
    refuse_empty(ids, where)
    limit = config.token_limit
    if limit is None or len(ids) < limit:
        return ids
    detail = f"the conversation has {len(ids)} tokens and the limit is {limit} (after {where[2]} turns)"
    if config.overlong == "error":
        raise OverlongPromptError(f"env {where[0]!r} seed {where[1]} step {where[2]}: {detail}; set "
                                  "rollout.overlong_prompt=end_episode or drop_episode to go on without it")
    raise EnvFault("overlong", *where, detail)


def extend_conversation(encoder: PromptEncoder, prompt: Sequence[int], answer: Sequence[int], observation: str,
                        had_action: bool, config: AgentLoopConfig, faults: FaultLog | None) -> tuple[list[int], bool]:
    """The next prompt after a turn that did not end its episode (the turn's prompt, its
    sampled answer, the missing closing tokens and the next observation), and whether the
    episode ends here under ``overlong="end_episode"`` because that prompt leaves no room
    for an answer (counted in ``faults.overlong_ended``)."""
    ids = encoder.conversation.extend(prompt, answer, next_message(observation, had_action))
    limit = config.token_limit
    ended = config.overlong == "end_episode" and limit is not None and len(ids) >= limit
    if ended and faults is not None:
        faults.overlong_ended += 1
    return ids, ended


def completion_text(comp: Completion, encoder: PromptEncoder) -> str:
    return comp.text or encoder.tokenizer.decode(comp.token_ids, skip_special_tokens=True)


def act(env: Env, text: str) -> tuple[str | None, StepResult | None]:
    """Parse the action from an answer (in the environment's text format) and step the
    environment with it (no step when there is no parseable action). The only part of a
    turn that touches the environment, so a scheduler may run it in a worker thread."""
    action = text_format_of(env).parse(text)
    return action, (env.step(action) if action is not None else None)


def guarded_act(ep: _Episode, text: str) -> tuple[str | None, StepResult | None] | EnvFault:
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


def finish_turn(
    ep: _Episode, prompt: list[int], comp: Completion, outcome: tuple[str | None, StepResult | None],
    config: AgentLoopConfig, encoder: PromptEncoder | None = None, faults: FaultLog | None = None,
) -> _Row:
    """Record the turn's row and advance the episode's history, observation and step
    count; a conversation episode that goes on gets its next prompt (``encoder``), and
    ends here under ``overlong="end_episode"`` when that prompt leaves no room for an
    answer (counted in ``faults.overlong_ended``)."""
    action, result = outcome
    anchor = ep.obs.anchor
    reward, env_done, valid, won, next_obs = turn_outcome(result, ep.obs)
    ep.history.append(Turn(ep.obs.text, action if valid else None))
    ep.obs = next_obs
    ep.steps += 1
    ep.done = env_done or ep.steps >= config.max_steps
    if config.episode_format == "conversation" and not ep.done:
        if encoder is None:
            raise ValueError("a conversation episode needs the encoder to extend its prompt")
        ep.ids, ep.done = extend_conversation(encoder, prompt, comp.token_ids, next_obs.text, result is not None, config,
                                              faults)
    return _Row(ep.group_id, ep.traj_id, ep.steps - 1, prompt, comp.token_ids, comp.logprobs,
                reward, ep.done, valid, won, anchor, reward_parts=reward_parts(result))


def rows_to_batch(rows: list[_Row], order: Callable[[_Row], tuple] = lambda r: (r.traj_id, r.step)) -> RolloutBatch:
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
    )
