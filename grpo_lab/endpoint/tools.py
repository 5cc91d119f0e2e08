"""Tool calls in a model's answer, parsed into the OpenAI API's ``tool_calls``.

A parser takes the answer's text and returns the text outside the calls, the calls
(each a name and its arguments as a JSON object), and whether the answer held a call
that did not parse; such an answer comes back as plain content, and the endpoint counts
it. Parsers are registry entries (:data:`TOOL_PARSERS`, ``serve.tool_parser``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..registry import Registry


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer split into its text and its tool calls; ``malformed``: it held a call
    that did not parse (then ``calls`` is empty and ``content`` the whole text)."""

    content: str
    calls: tuple[ToolCall, ...] = ()
    malformed: bool = False
    errors: tuple[str, ...] = field(default=(), compare=False)


ToolParser = Callable[[str], ParsedAnswer]

#: ``fn(text) -> ParsedAnswer``, by ``serve.tool_parser``
TOOL_PARSERS: Registry[ToolParser] = Registry("tool_parsers", "serve.tool_parser", "tool-call parser",
                                              options=lambda fn: ())

_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def call_from_json(payload: str) -> ToolCall:
    """A call from ``{"name": ..., "arguments": {...}}`` (arguments may also be a JSON
    string holding an object); ``ValueError`` naming what is wrong otherwise."""
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("not an object with a non-empty string 'name'")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ValueError("'arguments' is a string that is not JSON") from None
    if not isinstance(args, dict):
        raise ValueError("'arguments' is not a JSON object")
    return ToolCall(obj["name"], args)


@TOOL_PARSERS.register("hermes")
def hermes(text: str) -> ParsedAnswer:
    """Hermes-style <tool_call> blocks of JSON, as the Qwen2.5 and Qwen3 templates write them.

    Each block is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; a block
    opened and not closed, or whose JSON is not such an object, makes the answer
    malformed."""
    blocks = list(_HERMES_CALL.finditer(text))
    unclosed = text.count("<tool_call>") != len(blocks)
    if not blocks and not unclosed:
        return ParsedAnswer(text)
    calls, errors = [], []
    for block in blocks:
        try:
            calls.append(call_from_json(block.group(1).strip()))
        except ValueError as err:
            errors.append(f"tool call {len(calls) + len(errors) + 1}: {err}")
    if unclosed:
        errors.append("a <tool_call> block is not closed")
    if errors:
        return ParsedAnswer(text, (), True, tuple(errors))
    content = _HERMES_CALL.sub("", text).strip()
    return ParsedAnswer(content, tuple(calls))
