"""The multi-turn agent loop: groups of episodes that start from the same seed.

Every turn, the prompts of all running episodes go to the backend in one call; the
action is parsed from each answer, the environment steps, and an episode that ends
leaves the batch at once (it never generates again). Each agent step becomes one row of
a :class:`~grpo_lab.data.RolloutBatch`, with the exact prompt and response tokens.

The turn step is one pair of functions that every loop calls (this lock-step loop, the
scheduler's slots, the tree sampler's branches): :func:`episode_prompt` asks the episode
format (:mod:`~grpo_lab.rollout.formats`: ``memory`` or ``conversation``) for the next
prompt, and :func:`take_turn` turns a sampled answer and the environment's step into the
turn's outcome and what the format keeps for the next prompt. Either way a turn is a row.

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
from typing import Callable, Sequence

from ..data import RolloutBatch
from ..envs.base import Env, Observation, StepResult, role_instructions_of, text_format_of
from .backend import Backend, Completion, SamplingParams
from .episode import Episode, Row, act, close_env, completion_text, env_name, fail, guarded_act, new_episode, \
    reward_parts, rows_to_batch, turn_outcome
from .env_pool import EnvFault
from .faults import FaultLog, drop_failed
from .formats import EPISODE_FORMATS, OVERLONG_POLICIES, EpisodeFormat, OverlongPromptError
from .prompts import ACTION_STOP, PromptEncoder, Turn, turns_seen_by

__all__ = ["AgentLoopConfig", "OverlongPromptError", "TurnOutcome", "episode_prompt", "finish_turn",
           "request_seed_of", "run_episodes", "take_turn", "act", "close_env", "completion_text", "guarded_act",
           "rows_to_batch"]


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

    ``episode_format``: an :class:`~grpo_lab.rollout.formats.EpisodeFormat` (or its name
    in :data:`~grpo_lab.rollout.formats.EPISODE_FORMATS`): ``memory`` or ``conversation``;
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
    episode_format: "str | EpisodeFormat" = "memory"  # a name is resolved into its object
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
        if isinstance(self.episode_format, str):
            self.episode_format = EPISODE_FORMATS.get(self.episode_format)
        allowed = self.episode_format.overlong
        if self.overlong is None:
            self.overlong = allowed[0]
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={self.overlong!r} is not one of {list(OVERLONG_POLICIES)}")
        if self.overlong not in allowed:
            raise ValueError(f"overlong={self.overlong!r} does not apply to {self.episode_format.name} episodes: use one "
                             f"of {list(allowed)}")
        if self.max_episode_tokens is not None and (not self.episode_format.bounded or self.max_episode_tokens < 2):
            raise ValueError(f"max_episode_tokens={self.max_episode_tokens} needs episode_format=conversation and a "
                             "value >= 2")


def request_seed_of(base: int, traj_id: int, step: int) -> int:
    """A 63-bit seed for one request, mixed from ``(base, traj_id, step)`` (splitmix64)."""
    x = (int(base) * 0x9E3779B97F4A7C15 + int(traj_id) * 0xBF58476D1CE4E5B9 + int(step) * 0x94D049BB133111EB) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) >> 1


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
        new_episode(env_factory, first_group_id + i, member, config.group_size, seed, faults)
        for i, seed in enumerate(seeds)
        for member in range(config.group_size)
    ]
    rows: list[Row] = []
    pool = ThreadPoolExecutor(config.env_threads) if config.env_threads > 0 else None
    try:
        while True:
            running = [ep for ep in episodes if not ep.done]
            prompts = [episode_prompt(ep, encoder, config, faults) for ep in running]
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


def episode_prompt(ep: Episode, encoder: PromptEncoder, config: AgentLoopConfig,
                   faults: FaultLog | None = None) -> list[int] | None:
    """Token ids of the episode's next prompt, from its episode format; ``None`` when it
    cannot fit the context (the episode is then failed and counted). In a multi-agent
    episode the prompt is the acting role's: its instruction and its own turns of the
    current invocation."""
    role, invocation = ep.obs.role, ep.obs.invocation
    instructions = role_instructions_of(ep.env)
    where = f"{env_name(ep.env)} (seed {ep.seed}, step {ep.steps})"
    if not 0 <= role < len(instructions):
        raise ValueError(f"{where}: its observation names role {role}, but it has {len(instructions)} role "
                         "instruction(s)")
    if (invocation != -1) if role == 0 else (invocation < 0):
        raise ValueError(f"{where}: role {role} with invocation {invocation} (the main agent's is -1, a sub-agent's "
                         ">= 0)")
    if len(instructions) > 1 and not config.episode_format.per_role:
        raise ValueError(f"{where} has {len(instructions)} roles: the {config.episode_format.name} episode format "
                         "keeps one agent's conversation; use rollout.episode_format=memory")
    try:
        ep.ids = config.episode_format.prompt(encoder, instructions[role], turns_seen_by(ep.history, role, invocation),
                                              ep.obs.text, ep.ids, config, (env_name(ep.env), ep.seed, ep.steps), faults,
                                              text_format_of(ep.env))
        return ep.ids
    except EnvFault as fault:
        fail(ep, fault, faults)
        return None


@dataclass(frozen=True)
class TurnOutcome:
    """What one turn did: its reward, whether it ended the episode (the environment said
    so, ``max_steps`` was reached, or the next prompt would not fit), whether its action was
    valid and won, the next observation, the turn as the history shows it, what the episode
    format keeps for the next prompt (``ids``), and the reward's named parts."""

    reward: float
    done: bool
    valid: bool
    won: bool
    obs: Observation
    turn: Turn
    ids: list[int] | None
    parts: dict[str, float] | None


def take_turn(obs: Observation, steps: int, prompt: Sequence[int], answer: Sequence[int],
              outcome: tuple[str | None, StepResult | None], config: AgentLoopConfig, encoder: PromptEncoder,
              faults: FaultLog | None = None) -> TurnOutcome:
    """The turn step: the outcome of a turn taken in state ``obs`` after ``steps`` turns,
    with ``prompt`` and the sampled ``answer`` ids, the environment having stepped as
    ``outcome`` (:func:`act`) says. An episode that goes on asks its format for what the
    next prompt builds on; a conversation ends here under ``overlong="end_episode"`` when
    that prompt leaves no room for an answer (counted in ``faults.overlong_ended``)."""
    action, result = outcome
    reward, env_done, valid, won, next_obs = turn_outcome(result, obs)
    done = env_done or steps + 1 >= config.max_steps
    ids = None
    if not done:
        ids, done = config.episode_format.after_turn(encoder, prompt, answer, next_obs.text, result is not None, config,
                                                     faults)
    return TurnOutcome(reward, done, valid, won, next_obs, Turn(obs.text, action if valid else None, obs.role,
                                                               obs.invocation), ids, reward_parts(result))


def finish_turn(
    ep: Episode, prompt: list[int], comp: Completion, outcome: tuple[str | None, StepResult | None],
    config: AgentLoopConfig, encoder: PromptEncoder, faults: FaultLog | None = None,
) -> Row:
    """Record the turn's row (:func:`take_turn`) and advance the episode's history,
    observation, step count and next-prompt ids."""
    turn = take_turn(ep.obs, ep.steps, prompt, comp.token_ids, outcome, config, encoder, faults)
    anchor, role, invocation = ep.obs.anchor, ep.obs.role, ep.obs.invocation
    ep.history.append(turn.turn)
    ep.obs, ep.ids, ep.done = turn.obs, turn.ids, turn.done
    ep.steps += 1
    return Row(ep.group_id, ep.traj_id, ep.steps - 1, prompt, comp.token_ids, comp.logprobs, turn.reward, turn.done,
               turn.valid, turn.won, anchor, reward_parts=turn.parts, version=comp.version,
               truncated=comp.finish_reason == "length", role=role, invocation=invocation)
