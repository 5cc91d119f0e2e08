"""Episode formats: how an episode's turns become prompts, one object each.

- ``memory`` (verl-agent): every turn's prompt is rendered anew from the task, the last
  ``history_window`` turns and the observation; a prompt that does not fit the context
  shows fewer past turns (``truncate_history``).
- ``conversation`` (verl's agent loop, TRL's tool calling): one growing token sequence
  per episode, the sampled ids kept as they are and each observation appended once with
  the chat template's own separators (:mod:`~grpo_lab.rollout.conversation`); a
  conversation that outgrows its token limit ends at its last turn that fitted
  (``end_episode``).

``rollout.episode_format`` names one, resolved once (:data:`EPISODE_FORMATS`); the turn
step (:mod:`~grpo_lab.rollout.agent_loop`) asks it for each prompt and for what follows a
turn, whichever loop (lock-step, scheduler, tree) plays the episode. Register another
with ``EPISODE_FORMATS.register(name, format)``.

The limits a prompt must fit (``limits``) are the loop's settings: ``max_context``,
``token_limit`` (the context, or ``max_episode_tokens`` below it), ``overlong`` (the
policy for a prompt that does not fit, :data:`OVERLONG_POLICIES`) and ``history_window``.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from torch import Tensor

from ..envs.base import ACTION_FORMAT, Env, TextFormat
from ..registry import Registry
from .conversation import ConversationRenderer, first_message, next_message
from .demonstrations import conversation_demonstrations, encode_demonstrations, format_demonstrations
from .env_pool import EnvFault
from .faults import FaultLog
from .prompts import PromptEncoder, Turn, render_prompt

OVERLONG_POLICIES = ("truncate_history", "end_episode", "drop_episode", "error")


class OverlongPromptError(RuntimeError):
    """A prompt longer than the model's context, with ``overlong="error"``."""


class Limits(Protocol):
    """What a prompt must fit (an :class:`~grpo_lab.rollout.agent_loop.AgentLoopConfig`)."""

    max_context: int | None
    token_limit: int | None
    overlong: str | None
    history_window: int


def refuse_empty(ids: Sequence[int], where: tuple[str, int | None, int]) -> None:
    """An ``error`` fault for a prompt of no tokens (an empty observation without a chat
    template or instruction around it): no model can answer it."""
    if not ids:
        raise EnvFault("error", *where, "the prompt is empty (the instruction and observation encode to 0 tokens)")


def fit_prompt(
    encoder: PromptEncoder, instruction: str, history: Sequence[Turn], observation: str, config: Limits,
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


def fit_conversation(encoder: PromptEncoder, instruction: str, ids: Sequence[int] | None, observation: str,
                     config: Limits, where: tuple[str, int | None, int]) -> list[int]:
    """The next prompt of a conversation episode: ``ids`` (the conversation so far), or at
    its first turn (``ids`` None) the first prompt of the task and ``observation``. Raises
    :class:`OverlongPromptError` (``overlong="error"``) or the ``overlong`` fault when it
    leaves no room for an answer; ``where`` is ``(environment, seed, step)``."""
    ids = list(ids) if ids is not None else ConversationRenderer.of(encoder).start(first_message(instruction, observation))
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
                        had_action: bool, config: Limits, faults: FaultLog | None) -> tuple[list[int], bool]:
    """The next prompt after a turn that did not end its episode (the turn's prompt, its
    sampled answer, the missing closing tokens and the next observation), and whether the
    episode ends here under ``overlong="end_episode"`` because that prompt leaves no room
    for an answer (counted in ``faults.overlong_ended``)."""
    ids = ConversationRenderer.of(encoder).extend(prompt, answer, next_message(observation, had_action))
    limit = config.token_limit
    ended = config.overlong == "end_episode" and limit is not None and len(ids) >= limit
    if ended and faults is not None:
        faults.overlong_ended += 1
    return ids, ended




class EpisodeFormat:
    """How an episode's turns become prompts (module docstring).

    Attributes:
        name: its ``rollout.episode_format`` name.
        overlong: the overlong policies it applies, its default first.
        bounded: whether ``rollout.max_episode_tokens`` applies (an episode that grows).
        per_role: whether it renders each role of a multi-agent episode its own prompt.
    """

    name: str = ""
    overlong: tuple[str, ...] = ()
    bounded: bool = False
    per_role: bool = False

    def check(self, encoder: PromptEncoder) -> None:
        """Refuse (``TemplateError``) a chat template the format cannot work with, before
        the first turn."""

    def prompt(self, encoder: PromptEncoder, instruction: str, history: Sequence[Turn], observation: str,
               ids: Sequence[int] | None, limits: Limits, where: tuple[str, int | None, int], faults: FaultLog | None,
               fmt: TextFormat = ACTION_FORMAT) -> list[int]:
        """The token ids of the next prompt (``ids``: what :meth:`after_turn` kept, ``None``
        at the first turn); raises :class:`EnvFault` (``overlong``) or
        :class:`OverlongPromptError` when it cannot fit ``limits``; ``where`` is
        ``(environment, seed, step)``."""
        raise NotImplementedError

    def after_turn(self, encoder: PromptEncoder, prompt: Sequence[int], answer: Sequence[int], observation: str,
                   had_action: bool, limits: Limits, faults: FaultLog | None) -> tuple[list[int] | None, bool]:
        """After a turn that did not end its episode: what the next :meth:`prompt` builds
        on (or ``None``), and whether the episode ends here because that prompt would not
        fit."""
        return None, False

    def demonstrations(self, envs: Callable[[], Env], episodes: int, max_steps: int, seed: int,
                       encoder: PromptEncoder, eos_id: int | None, limits: Limits) -> list[tuple[Tensor, Tensor]]:
        """Token ``(prompt, answer)`` pairs of format-only demonstrations written as this
        format writes its turns (the supervised warm-up)."""
        raise NotImplementedError


class MemoryFormat(EpisodeFormat):
    """Each turn's prompt rendered anew from the task, a window of past turns and the observation."""

    name, overlong = "memory", ("truncate_history", "drop_episode", "error")
    per_role = True  # each role of a multi-agent episode gets its own prompt

    def prompt(self, encoder, instruction, history, observation, ids, limits, where, faults, fmt=ACTION_FORMAT):
        return fit_prompt(encoder, instruction, history, observation, limits, where, faults, fmt)

    def demonstrations(self, envs, episodes, max_steps, seed, encoder, eos_id, limits):
        pairs = list(format_demonstrations(envs, episodes, max_steps, limits.history_window, seed))
        return encode_demonstrations(pairs, encoder, eos_id, limits.max_context)


class ConversationFormat(EpisodeFormat):
    """One growing token sequence per episode: sampled ids kept, observations appended once."""

    name, overlong, bounded = "conversation", ("end_episode", "drop_episode", "error"), True

    def check(self, encoder):
        ConversationRenderer.of(encoder)

    def prompt(self, encoder, instruction, history, observation, ids, limits, where, faults, fmt=ACTION_FORMAT):
        return fit_conversation(encoder, instruction, ids, observation, limits, where)

    def after_turn(self, encoder, prompt, answer, observation, had_action, limits, faults):
        return extend_conversation(encoder, prompt, answer, observation, had_action, limits, faults)

    def demonstrations(self, envs, episodes, max_steps, seed, encoder, eos_id, limits):
        return conversation_demonstrations(envs, episodes, max_steps, seed, encoder, eos_id, limits.token_limit)


#: :class:`EpisodeFormat` objects by ``rollout.episode_format``
EPISODE_FORMATS: Registry[EpisodeFormat] = Registry("episode_formats", "rollout.episode_format", "episode format",
                                                    options=lambda f: (f"overlong_prompt: {' | '.join(f.overlong)}",))
MEMORY = EPISODE_FORMATS.register("memory", MemoryFormat())
CONVERSATION = EPISODE_FORMATS.register("conversation", ConversationFormat())
