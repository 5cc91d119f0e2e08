"""Demonstrations of the answer format: episodes of random legal actions, written as each
episode format writes its turns, for the supervised warm-up (they teach the format, never
a good policy), and prompt text for a tokenizer's corpus."""

from __future__ import annotations

import logging
import random
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..envs.base import Env, Observation, role_instructions_of, text_format_of
from .conversation import ConversationRenderer, first_message, next_message
from .env_pool import EnvFault, guard
from .episode import close_env
from .prompts import PromptEncoder, Turn, render_prompt, turns_seen_by

log = logging.getLogger("grpo_lab")


def demonstration_episodes(
    env_factory: Callable[[], Env], num_episodes: int, max_steps: int, seed: int
) -> Iterator[tuple[Env, list[tuple[str, str]]]]:
    """Episodes of uniformly random legal actions: the environment and its ``(observation,
    action)`` turns. An episode whose environment fails ends there (its earlier
    turns stay: they are well-formed) and is logged. An environment without legal actions
    (``legal_actions() == []``, e.g. a dataset scored by reward functions) yields nothing
    (the trainer then skips the warm-up, and its tokenizer learns from
    :func:`prompt_corpus`)."""
    rng = random.Random(seed)
    env = guard(env_factory())
    cut: list[str] = []
    for _ in range(num_episodes):
        turns: list[tuple[Observation, str]] = []
        try:
            obs = env.reset(rng.randrange(2**31))
            for _ in range(max_steps):
                legal = env.legal_actions()
                if not legal:
                    break
                action = rng.choice(legal)
                turns.append((obs, action))
                result = env.step(action)
                obs = result.observation
                if result.done:
                    break
        except EnvFault as fault:
            cut.append(str(fault))
            close_env(env)
            env = guard(env_factory())
        if turns:
            yield env, turns
    close_env(env)
    if cut:
        log.warning("%d of %d demonstration episodes were cut short by environment faults; the first: %s",
                    len(cut), num_episodes, cut[0])


def format_demonstrations(
    env_factory: Callable[[], Env], num_episodes: int, max_steps: int, history_window: int, seed: int
) -> Iterator[tuple[str, str]]:
    """``(prompt_text, answer_text)`` pairs of memory-format prompts from
    :func:`demonstration_episodes`, the actions written in the environment's text format
    (in a multi-agent episode, each turn's prompt is its role's, as the rollout writes it)."""
    for env, turns in demonstration_episodes(env_factory, num_episodes, max_steps, seed):
        fmt = text_format_of(env)
        instructions = role_instructions_of(env)
        history: list[Turn] = []
        for obs, action in turns:
            seen = turns_seen_by(history, obs.role, obs.invocation)
            yield render_prompt(instructions[obs.role], seen, obs.text, history_window, fmt), fmt.format(action)
            history.append(Turn(obs.text, action, obs.role, obs.invocation))


def conversation_demonstrations(
    env_factory: Callable[[], Env], num_episodes: int, max_steps: int, seed: int, encoder: PromptEncoder,
    eos_id: int | None, max_tokens: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Token ``(prompt, answer)`` pairs of conversation episodes
    (:mod:`~grpo_lab.rollout.conversation`) from :func:`demonstration_episodes`: each
    answer (the action in the environment's text format, then EOS when there is one)
    extends the conversation as a sampled answer would. An episode stops at its first
    turn past ``max_tokens``."""
    out = []
    renderer = ConversationRenderer.of(encoder)
    for env, turns in demonstration_episodes(env_factory, num_episodes, max_steps, seed):
        fmt = text_format_of(env)
        ids: list[int] | None = None
        answer: list[int] = []
        for obs, action in turns:
            ids = (renderer.start(first_message(env.instruction, obs.text)) if ids is None
                   else renderer.extend(ids, answer, next_message(obs.text, True)))
            answer = encoder.tokenizer(fmt.format(action), add_special_tokens=False)["input_ids"]
            answer = answer + ([eos_id] if eos_id is not None else [])
            if max_tokens is not None and len(ids) + len(answer) > max_tokens:
                break
            out.append((torch.tensor(ids), torch.tensor(answer)))
    return out


def prompt_corpus(env_factory: Callable[[], Env], num_episodes: int, seed: int) -> Iterator[str]:
    """The first prompt's text of ``num_episodes`` episodes (for a tokenizer's corpus when
    the environment has no demonstrations); episodes whose reset fails are left out."""
    rng = random.Random(seed)
    env = guard(env_factory())
    fmt = text_format_of(env)
    try:
        for _ in range(num_episodes):
            try:
                obs = env.reset(rng.randrange(2**31))
            except EnvFault:
                close_env(env)
                env = guard(env_factory())
                continue
            yield render_prompt(env.instruction, [], obs.text, 0, fmt)
    finally:
        close_env(env)


def encode_demonstrations(
    pairs: list[tuple[str, str]], encoder: PromptEncoder, eos_id: int | None, max_context: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Token ids of each (prompt, answer); the answer ends with EOS when there is one.
    Demonstrations longer than ``max_context`` tokens are left out (and logged)."""
    out, skipped = [], 0
    for prompt, answer in pairs:
        answer_ids = encoder.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if eos_id is not None:
            answer_ids = answer_ids + [eos_id]
        prompt_ids = encoder.encode(prompt)
        if max_context is not None and len(prompt_ids) + len(answer_ids) > max_context:
            skipped += 1
            continue
        out.append((torch.tensor(prompt_ids), torch.tensor(answer_ids)))
    if skipped:
        log.warning("%d of %d warm-up demonstrations are longer than the model's context (%d tokens) and were left out",
                    skipped, len(pairs), max_context)
    return out
