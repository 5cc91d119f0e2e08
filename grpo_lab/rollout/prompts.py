"""Prompt text for agent steps, and parsing the action out of an answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from ..envs.base import ACTION_FORMAT, TextFormat

ACTION_STOP = ACTION_FORMAT.stop[0]  # "</action>"


def parse_action(text: str) -> str | None:
    """The text inside the last ``<action>...</action>`` of an answer, stripped; ``None``
    when there is none or it is empty (:data:`~grpo_lab.envs.base.ACTION_FORMAT`; an
    environment with its own ``text_format`` parses with that)."""
    return ACTION_FORMAT.parse(text)


def format_action(action: str) -> str:
    return ACTION_FORMAT.format(action)


@dataclass(frozen=True)
class Turn:
    """One past step as the prompt shows it: the observation and the action taken
    (``None`` when the answer had no parseable action); in a multi-agent episode, the
    role that acted and its invocation (a role sees its own turns of its invocation only)."""

    observation: str
    action: str | None
    role: int = 0
    invocation: int = -1


def turns_seen_by(history: Sequence[Turn], role: int, invocation: int) -> list[Turn]:
    """The turns of ``history`` that ``role``'s ``invocation`` took (every turn of a
    single-agent episode)."""
    return [t for t in history if t.role == role and t.invocation == invocation]


def render_prompt(instruction: str, history: Sequence[Turn], observation: str, window: int,
                  fmt: TextFormat = ACTION_FORMAT) -> str:
    """The prompt text of one agent step: the task, the last ``window`` turns (their
    actions written in ``fmt``), and the current observation. An unframed format
    (``fmt.framed=False``, single-turn datasets) gives the instruction and the observation
    alone."""
    if not fmt.framed:
        return f"{instruction}\n\n{observation}" if instruction else observation
    parts = [instruction]
    shown = list(history)[-window:] if window > 0 else []
    if shown:
        first = len(history) - len(shown) + 1
        parts.append(f"Your last {len(shown)} turns:")
        for k, turn in enumerate(shown, start=first):
            answer = fmt.format(turn.action) if turn.action is not None else "(no valid action)"
            parts.append(f"Turn {k}:\n{turn.observation}\nYou answered: {answer}")
    parts.append(f"Now:\n{observation}\nYour answer:")
    return "\n".join(parts)


class PromptEncoder:
    """Turns prompt text into token ids, through the tokenizer's chat template when it has
    one and ``use_chat_template`` allows it (``"auto"``, ``True`` or ``False``). A
    ``system`` text, when given, opens every prompt: as the system message of a chat
    template, else as plain text followed by a blank line."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, use_chat_template: str | bool = "auto",
                 system: str = "") -> None:
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if use_chat_template is True and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        if use_chat_template not in ("auto", True, False):
            raise ValueError(f"use_chat_template must be 'auto', true or false, got {use_chat_template!r}")
        self.tokenizer = tokenizer
        self.chat = has_template and use_chat_template in ("auto", True)
        self.system = system

    def messages(self, text: str) -> list[dict]:
        """The chat messages of a prompt: the system text, when given, and the user's ``text``."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": text}]

    def encode(self, text: str) -> list[int]:
        if self.chat:
            ids = self.tokenizer.apply_chat_template(self.messages(text), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        if self.system:
            text = f"{self.system}\n\n{text}"
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]
