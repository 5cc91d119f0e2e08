"""Chat messages to token ids, and the token capture of an episode's calls.

Each call an agent makes is one row, as in ``rollout.episode_format=conversation``: its
prompt ids, the ids the engine sampled and their log-probs. When a call's messages extend
the previous call's conversation (the same messages, the model's own answer as the
endpoint returned it, then new messages: tool results, a user turn), its prompt is the
previous prompt and sampled ids verbatim, the template's closing tokens the answer still
lacks, and the new messages' tokens; nothing sampled is decoded and encoded again. Any
other call (an agent that summarises, drops or edits its history) starts a new prefix
rendered by the chat template; the trie forward still encodes what the rows share once.

The new messages' tokens are what the chat template writes after the assistant turn's
closing text when it renders the whole conversation. A template that renders the earlier
turns differently once a new one follows (Qwen3 drops the reasoning of past answers)
cannot be extended this way: such a call starts a new prefix and is counted
(``template_rewrites``). Departure from the conversation episode format: the first prompt
is the template's rendering of the agent's own messages (system prompt and tools as the
agent sends them), not the environment's instruction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

from ..rollout.backend import Completion
from ..rollout.conversation import ConversationRenderer, TemplateError
from ..rollout.prompts import PromptEncoder


class MessageError(ValueError):
    """A request's messages that the chat template cannot render (the endpoint answers 400)."""


def content_text(content: Any) -> str:
    """A message's content as text: a string, ``None`` (an assistant message with only
    tool calls), or a list of parts whose ``text`` parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MessageError(f"only text content parts are supported, got {str(part)[:80]!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise MessageError(f"a message's content must be a string, null or a list of text parts, got {type(content).__name__}")


def call_arguments(arguments: Any) -> Any:
    """A tool call's arguments as the template renders them: a JSON string parsed into
    its object (as vLLM does), anything else as it is."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def template_message(message: dict) -> dict:
    """A request message as the chat template takes it: text content, and tool calls
    with their arguments as objects."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise MessageError(f"each message must be an object with a string 'role', got {str(message)[:80]!r}")
    out = {k: v for k, v in message.items() if v is not None}
    out["content"] = content_text(message.get("content"))
    calls = message.get("tool_calls")
    if calls:
        rendered = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise MessageError(f"a tool call needs a function with a name, got {str(call)[:80]!r}")
            rendered.append({**call, "function": {"name": fn["name"], "arguments": call_arguments(fn.get("arguments"))}})
        out["tool_calls"] = rendered
    return out


def message_key(message: dict) -> tuple:
    """What makes two messages the same turn for token capture: role, text, tool calls
    (name and arguments, whatever their JSON spacing or key order; not their ids), and a
    tool message's call id and name."""
    calls = tuple((c["function"]["name"], json.dumps(c["function"]["arguments"], sort_keys=True))
                  for c in message.get("tool_calls") or ())
    return (message["role"], message["content"], calls, message.get("tool_call_id"), message.get("name"))


def tools_key(tools: Sequence[dict] | None) -> str:
    return json.dumps(list(tools or []), sort_keys=True)


class ChatTemplate:
    """A tokenizer's chat template, rendering request messages (with ``tools``) to
    token ids; building it checks that assistant turns can be continued
    (:class:`~grpo_lab.rollout.conversation.ConversationRenderer`)."""

    def __init__(self, tokenizer) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError("the tokenizer has no chat template: chat completions need one (use /v1/completions)")
        self.tokenizer = tokenizer
        self.renderer = ConversationRenderer(PromptEncoder(tokenizer, True, ""))

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                                      add_generation_prompt=generation_prompt, tokenize=False)
        except Exception as err:  # jinja raises what the template raises
            raise MessageError(f"the chat template cannot render these messages: {err}") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: Sequence[dict], tools: Sequence[dict] | None) -> list[int]:
        """The rendering of ``messages`` up to the assistant's generation prompt."""
        return self.encode(self.render(messages, tools, True))

    def continuation_ids(self, messages: Sequence[dict], answered: int, tools: Sequence[dict] | None
                         ) -> list[int] | None:
        """The tokens of ``messages[answered:]`` and the next generation prompt, as the
        template writes them after the closing text of the assistant message
        ``messages[answered - 1]``; ``None`` when the template renders the turns before
        them differently once they follow (then the call starts a new prefix)."""
        last = self.render(messages[:answered], tools, False)
        full = self.render(messages, tools, True)
        close, last_close = self.renderer.close_text, self.renderer.last_close_text
        if not last.endswith(last_close):
            return None
        body = len(last) - len(last_close)
        if full[:body] != last[:body] or not full[body:].startswith(close):
            return None
        return self.encode(full[body + len(close):])


@dataclass
class CapturedCall:
    """One call of an episode: its row's prompt and sampled ids, and how it was made."""

    messages: tuple[tuple, ...]  # the request's messages (message_key), for the next call's check
    tools: str  # tools_key of the request
    prompt_ids: list[int]
    completion: Completion  # the sampled ids and their log-probs, as the engine returned them
    assistant: tuple  # message_key of the answer as the endpoint returned it
    extends: bool  # the prompt reuses the previous call's prompt and sampled ids
    reward: float = 0.0  # attached by the agent (ctx), or the episode's reward on its last call
    anchor: Hashable | None = None  # an environment state key attached by the agent (GiGPO's step groups)
    role: int = 0  # the role the request's model addressed (0: the main agent)
    invocation: int = -1  # a sub-agent call's invocation: the continued call's; -1: a new one (record numbers it)


@dataclass
class EpisodeCapture:
    """The calls of one episode, in order, and how many prompts could not extend the
    previous call because the template rewrote earlier turns."""

    calls: list[CapturedCall] = field(default_factory=list)
    template_rewrites: int = 0

    def continued(self, keys: tuple[tuple, ...], tools: Sequence[dict] | None, role: int) -> CapturedCall | None:
        """The newest recorded call of ``role`` whose conversation ``keys`` continue (its
        messages, then its answer, then more), with the same tools; ``None``."""
        for prev in reversed(self.calls):
            n = len(prev.messages) + 1
            if (prev.role == role and len(keys) > n and keys[:n - 1] == prev.messages and keys[n - 1] == prev.assistant
                    and tools_key(tools) == prev.tools):
                return prev
        return None

    def continued_by_tokens(self, prompt: Sequence[int], role: int) -> CapturedCall | None:
        """The newest recorded call of ``role`` whose prompt and sampled ids ``prompt``
        starts with (a completions-API conversation); ``None``."""
        for prev in reversed(self.calls):
            head = [*prev.prompt_ids, *prev.completion.token_ids]
            if prev.role == role and len(prompt) > len(head) and list(prompt[: len(head)]) == head:
                return prev
        return None

    def prompt_for(self, template: ChatTemplate, messages: Sequence[dict], tools: Sequence[dict] | None,
                   role: int = 0) -> tuple[list[int], bool, tuple[tuple, ...], CapturedCall | None]:
        """The prompt ids of a call of ``role`` with ``messages`` (template messages),
        whether they extend the call whose conversation they continue, the messages' keys,
        and that call (``None``: a new conversation)."""
        keys = tuple(message_key(m) for m in messages)
        prev = self.continued(keys, tools, role)
        if prev is not None:
            delta = template.continuation_ids(messages, len(prev.messages) + 1, tools)
            if delta is not None:
                answer = prev.completion.token_ids
                closing = template.renderer.closing(answer)
                return [*prev.prompt_ids, *answer, *closing, *delta], True, keys, prev
            self.template_rewrites += 1
        return template.prompt_ids(messages, tools), False, keys, prev

    def record(self, call: CapturedCall) -> None:
        """Add ``call``. A sub-agent call (role > 0) carries the invocation of the call it
        continues; one with invocation -1 opens its role's next invocation (numbered from
        0 in the order they are recorded)."""
        if call.role > 0 and call.invocation < 0:
            call.invocation = 1 + max((c.invocation for c in self.calls if c.role == call.role), default=-1)
        self.calls.append(call)
