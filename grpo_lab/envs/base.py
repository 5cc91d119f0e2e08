"""The environment protocol: text in, text out, plus an anchor.

Environments know nothing of tokens. ``reset(seed)`` must be deterministic in ``seed``
so that the G episodes of one group start from the same state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol, runtime_checkable


@dataclass(frozen=True)
class Observation:
    """What the agent sees, and the exact state it sees it from.

    ``anchor`` is a hashable key of the environment state: two observations with equal
    anchors came from identical states (GiGPO groups steps by it).

    A multi-agent environment (one whose ``role_instructions`` name several roles) says
    which agent acts next: ``role`` (an index into its roles, 0 the main agent) and, for a
    sub-agent, ``invocation``: which of its invocations in the episode this is (0, 1, ...;
    the turns of one invocation share it), -1 for the main agent.
    """

    text: str
    anchor: Hashable
    role: int = 0
    invocation: int = -1


@dataclass(frozen=True)
class StepResult:
    """The outcome of one ``Env.step``.

    ``info`` always carries ``won`` (the task was solved) and ``valid_action`` (the
    action was legal in the state it was taken from; an illegal action leaves the state
    unchanged).
    """

    observation: Observation
    reward: float
    done: bool
    info: dict[str, Any]


@dataclass(frozen=True)
class TextFormat:
    """How an environment's actions sit in the model's answers, and how its prompts look.

    ``tags``: the action is the text inside the last ``<tag>...</tag>`` of the answer for
    any of these tags (``("action",)``, the default: ``<action>left</action>`` gives
    ``left``); with ``keep_tags`` the action is that whole element (``<search>q</search>``,
    for environments with several kinds of action). No tags: the whole answer, stripped, is
    the action (single-turn datasets scored by reward functions). Generation stops at a
    closing tag (:attr:`stop`), or at end of sequence when there are no tags.

    ``framed``: the prompt shows the instruction, the past turns and the observation under
    ``Now:`` and ends with ``Your answer:`` (multi-turn environments). ``False``: the
    prompt is the instruction (when there is one) and the observation alone, as a dataset's
    prompt column is used by TRL's trainers.
    """

    tags: tuple[str, ...] = ("action",)
    keep_tags: bool = False
    framed: bool = True
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for tag in self.tags:
            if not re.fullmatch(r"[A-Za-z_][\w-]*", tag):
                raise ValueError(f"an answer tag must be a plain name like 'action', got {tag!r}")
        if self.tags:
            names = "|".join(map(re.escape, self.tags))
            object.__setattr__(self, "_pattern", re.compile(rf"<({names})>(.*?)</\1>", re.DOTALL))

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings for generation: the closing tags."""
        return tuple(f"</{tag}>" for tag in self.tags)

    def parse(self, text: str) -> str | None:
        """The action in an answer; ``None`` when there is none or it is empty."""
        if self._pattern is None:
            return text.strip() or None
        matches = list(self._pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        inner = last.group(2).strip()
        if not inner:
            return None
        return f"<{last.group(1)}>{inner}</{last.group(1)}>" if self.keep_tags else inner

    def format(self, action: str) -> str:
        """The answer that carries ``action`` (its inverse on well-formed actions)."""
        if not self.tags or self.keep_tags:
            return action
        return f"<{self.tags[0]}>{action}</{self.tags[0]}>"


#: ``<action>...</action>``, framed prompts: the format of every environment that does not
#: declare its own ``text_format``.
ACTION_FORMAT = TextFormat()


def role_instructions_of(env: Any) -> tuple[str, ...]:
    """The instruction of each role of ``env`` (its ``role_instructions``; a single-agent
    environment: its ``instruction`` alone, '' where a class sets it per instance)."""
    found = getattr(env, "role_instructions", None)
    return tuple(found) if found else (getattr(env, "instruction", ""),)


def text_format_of(env: Any) -> TextFormat:
    """The environment's :class:`TextFormat` (its ``text_format`` attribute, else
    :data:`ACTION_FORMAT`)."""
    fmt = getattr(env, "text_format", None)
    if fmt is None:
        return ACTION_FORMAT
    if not isinstance(fmt, TextFormat):
        raise TypeError(f"{type(env).__name__}.text_format must be a TextFormat, got {fmt!r}")
    return fmt


@runtime_checkable
class Env(Protocol):
    """A multi-step text environment."""

    #: Task description shown at the top of every prompt; it includes the action format.
    instruction: str

    def reset(self, seed: int) -> Observation:
        """Start an episode; equal seeds give equal initial states."""
        ...

    def step(self, action: str) -> StepResult:
        """Apply an action given as text (already extracted from the model's answer)."""
        ...

    def legal_actions(self) -> list[str]:
        """The actions that are legal in the current state (admissible commands). An
        environment whose legal actions are unbounded (an arithmetic expression, a search
        query) returns a sample of well-formed ones drawn from the state, and one with no
        notion of a legal action (a dataset scored by reward functions) returns ``[]``:
        the format warm-up plays these, so they must never be chosen for being good."""
        ...


#: optional members an environment may add to the protocol: ``text_format``
#: (:class:`TextFormat`; default ``<action>`` tags), ``close()`` (release resources) and
#: ``role_instructions`` (a multi-agent environment: each role's instruction, role 0's
#: equal to ``instruction``; its observations name the acting role).
