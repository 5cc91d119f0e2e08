"""The multi-turn agent loop: groups of episodes that start from the same seed.

Every turn, the prompts of all running episodes go to the backend in one call; the
action is parsed from each answer, the environment steps, and an episode that ends
leaves the batch at once (it never generates again). Each agent step becomes one row of
a :class:`~grpo_lab.data.RolloutBatch`, with the exact prompt and response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from ..data import RolloutBatch
from ..envs.base import Env, Observation, StepResult
from .backend import Backend, Completion, SamplingParams
from .prompts import ACTION_STOP, PromptEncoder, Turn, parse_action, render_prompt


@dataclass
class AgentLoopConfig:
    """``group_size`` episodes per seed; at most ``max_steps`` turns per episode; the
    prompt shows the last ``history_window`` turns.

    ``request_seed``: when set, the request of turn ``t`` of trajectory ``j`` samples with
    seed :func:`request_seed_of` ``(request_seed, j, t)``, so an episode does not depend
    on which other requests share its batch (any scheduler gives the same episodes).
    """

    group_size: int = 8
    max_steps: int = 10
    history_window: int = 2
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=16, stop=(ACTION_STOP,)))
    request_seed: int | None = None

    def params_for(self, traj_id: int, step: int) -> SamplingParams:
        if self.request_seed is None:
            return self.sampling
        return self.sampling.with_seed(request_seed_of(self.request_seed, traj_id, step))

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.history_window < 0:
            raise ValueError(f"history_window must be >= 0, got {self.history_window}")


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
    obs: Observation
    history: list[Turn] = field(default_factory=list)
    steps: int = 0
    done: bool = False


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


def run_episodes(
    backend: Backend,
    encoder: PromptEncoder,
    env_factory: Callable[[], Env],
    seeds: Sequence[int],
    config: AgentLoopConfig,
    first_group_id: int = 0,
) -> RolloutBatch:
    """Play ``config.group_size`` episodes from each seed in ``seeds``.

    Group ``first_group_id + i`` holds the episodes of ``seeds[i]``; trajectory ids are
    ``group * group_size + member``. Rows come out grouped by episode, in step order.

    An answer without a parseable ``<action>`` does not reach the environment: the state
    stays, the step counts toward ``max_steps`` and is marked invalid. An action the
    environment calls illegal is marked invalid too.
    """
    episodes = [
        _new_episode(env_factory, first_group_id + i, member, config.group_size, seed)
        for i, seed in enumerate(seeds)
        for member in range(config.group_size)
    ]
    rows: list[_Row] = []
    instruction = episodes[0].env.instruction if episodes else ""
    while True:
        running = [ep for ep in episodes if not ep.done]
        if not running:
            break
        prompts = [episode_prompt(ep, encoder, instruction, config) for ep in running]
        completions = backend.generate(prompts, [config.params_for(ep.traj_id, ep.steps) for ep in running])
        if len(completions) != len(running):
            raise RuntimeError(f"backend returned {len(completions)} completions for {len(running)} prompts")
        for ep, prompt, comp in zip(running, prompts, completions):
            text = completion_text(comp, encoder)
            rows.append(finish_turn(ep, prompt, comp, act(ep.env, text), config))
    return rows_to_batch(rows)


def _new_episode(env_factory: Callable[[], Env], group: int, member: int, group_size: int, seed: int) -> _Episode:
    env = env_factory()
    return _Episode(env, group, group * group_size + member, env.reset(int(seed)))


def episode_prompt(ep: _Episode, encoder: PromptEncoder, instruction: str, config: AgentLoopConfig) -> list[int]:
    """Token ids of the episode's next prompt."""
    return encoder.encode(render_prompt(instruction, ep.history, ep.obs.text, config.history_window))


def completion_text(comp: Completion, encoder: PromptEncoder) -> str:
    return comp.text or encoder.tokenizer.decode(comp.token_ids, skip_special_tokens=True)


def act(env: Env, text: str) -> tuple[str | None, StepResult | None]:
    """Parse the action from an answer and step the environment with it (no step when
    there is no parseable action). The only part of a turn that touches the environment,
    so a scheduler may run it in a worker thread."""
    action = parse_action(text)
    return action, (env.step(action) if action is not None else None)


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
    config: AgentLoopConfig,
) -> _Row:
    """Record the turn's row and advance the episode's history, observation and step count."""
    action, result = outcome
    anchor = ep.obs.anchor
    reward, env_done, valid, won, next_obs = turn_outcome(result, ep.obs)
    ep.history.append(Turn(ep.obs.text, action if valid else None))
    ep.obs = next_obs
    ep.steps += 1
    ep.done = env_done or ep.steps >= config.max_steps
    return _Row(ep.group_id, ep.traj_id, ep.steps - 1, prompt, comp.token_ids, comp.logprobs,
                reward, ep.done, valid, won, anchor)


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
    )
