"""Conversation episodes: one growing token sequence per episode, token in, token out.

The ``memory`` episode format re-renders every turn's prompt from the task, a window of
past turns and the new observation (verl-agent). The ``conversation`` format keeps one
token sequence per episode instead, as verl's agent loop and TRL's tool calling do:

- the first prompt is the chat template's rendering of the system text and the first
  user message (task and observation), ending with the assistant's generation prompt;
- the model's sampled token ids are appended as they are: never decoded and encoded again;
- then the assistant turn's closing tokens that were not sampled (the template's
  end-of-turn token and the separator after it, e.g. ChatML's ``<|im_end|>\\n``: a model
  that stops on ``<|im_end|>`` leaves the ``\\n``, the verl#6501 class of bug), the next
  user message (the observation, tokenized once) and the generation prompt again.

So the tokens of turn ``k``'s prompt and answer are a prefix of turn ``k + 1``'s prompt
(:func:`is_prefix` checks it in tests), every observation is encoded once, and each row of
the batch is one turn whose loss mask covers its own answer only: observation tokens and
earlier answers sit in the prompt, outside the loss. The trie-packed training forward
(:mod:`grpo_lab.training.trie`) then encodes each episode once.

The closing tokens and the user-turn tokens come from the tokenizer's own chat
template, rendered on a probe conversation when the renderer is built (so a template
that cannot work is refused before the first turn): what the template writes after an
assistant message's text when a user message follows, and what that user message adds.
A template may close a *last* assistant message differently (Phi-3 and Phi-3.5 add the
end-of-text token when no generation prompt follows); the continued form is the one
appended, as it is what the template writes between two turns. Departures stated: a
template that rewrites earlier turns when a new one comes (Qwen3 drops the reasoning of
past answers) would re-render them; here, as in verl, earlier turns stay as they were
sampled, which is the point of token in, token out. A template that writes the system
prompt into the *last* user message (Mistral v0.3 and Nemo) moves it at every turn, which
no growing token sequence can follow: with a system prompt it is refused, saying so.
Without a chat template (or ``use_chat_template=false``) the conversation is plain text:
the first prompt as the memory format writes it, each answer followed by the
end-of-sequence token and the next observation on a new paragraph.
"""

from __future__ import annotations

import weakref
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from .prompts import PromptEncoder

_PROBE_USER, _PROBE_ANSWER, _PROBE_NEXT = "Probe question 7?", "Probe answer 9 (q7x).", "Probe reply 8 (z4k)."


class TemplateError(ValueError):
    """A chat template whose turns cannot be written one after another."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


class ConversationRenderer:
    """Token deltas of a conversation under ``encoder``'s chat template (or plain text, when
    it has none or does not use it), opened by its system text; the first prompt is the
    encoder's own. Building it checks the template (:class:`TemplateError`).

    Attributes:
        close_ids: the tokens the template puts after an assistant message's text when
            a user message follows.
        close_text: the same as text ('' without a chat template).
        last_close_text: what the template writes after an assistant message's text when
            it is the last message (``close_text`` begins it).
    """

    _built: "weakref.WeakKeyDictionary[PromptEncoder, ConversationRenderer]" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, encoder: PromptEncoder) -> "ConversationRenderer":
        """The renderer of ``encoder``, built (and its template checked) at first use."""
        if encoder not in cls._built:
            cls._built[encoder] = cls(encoder)
        return cls._built[encoder]

    def __init__(self, encoder: PromptEncoder) -> None:
        self.encoder, self.tokenizer, self.chat = encoder, encoder.tokenizer, encoder.chat
        self.close_text = self.last_close_text = ""
        if self.chat:
            self._probe = encoder.messages(_PROBE_USER) + [{"role": "assistant", "content": _PROBE_ANSWER}]
            self.close_text = self._continued_close()
            self.close_ids = self._encode(self.close_text)
        else:
            eos = self.tokenizer.eos_token_id
            self.close_ids = [eos] if eos is not None else []

    def _after_answer(self, text: str) -> str:
        """The rendering ``text`` after the probe's assistant answer."""
        k = text.find(_PROBE_ANSWER)
        if k < 0:
            raise TemplateError(f"the chat template does not write an assistant message's text as given (rendered "
                                f"{text[-120:]!r}); use rollout.episode_format=memory with it")
        return text[k + len(_PROBE_ANSWER):]

    def _continued_close(self) -> str:
        """What the template writes after an assistant message's text when a user message
        follows: the longest text, ending on a token boundary, that both the last-message
        rendering (``<|end|>\\n<|endoftext|>`` for Phi-3) and the continued one
        (``<|end|>\\n<|user|>...``) begin with. Refuses a template that writes the system
        prompt after that answer."""
        last = self.last_close_text = self._after_answer(_render(self.tokenizer, self._probe, False))
        continued = self._after_answer(_render(self.tokenizer, self._probe + [{"role": "user", "content": _PROBE_NEXT}],
                                               True))
        system = self.encoder.system
        if system and system.strip() in continued:
            raise TemplateError(
                "the chat template writes the system prompt into the last user message (Mistral's templates do), so "
                "it moves at every turn and the conversation's earlier tokens would change when a new turn comes, "
                "which a token-in/token-out episode cannot follow: put the system text into the task and set "
                "rollout.system_prompt='', or use rollout.episode_format=memory")
        ids = self._encode(last)
        cut = 0
        while cut < min(len(last), len(continued)) and last[cut] == continued[cut]:
            cut += 1
        while cut > 0 and self._encode(last[:cut]) != ids[:len(self._encode(last[:cut]))]:
            cut -= 1  # back to a token boundary of both: "<|end|>\n<|" is not one
        if cut == 0 and last:
            raise TemplateError(f"the chat template closes an assistant message with {last!r} when it is last but "
                                f"writes {continued[:len(last) + 20]!r} when a user message follows; use "
                                "rollout.episode_format=memory with it")
        return last[:cut]

    # ------------------------------------------------------------------ text and tokens
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def start(self, text: str) -> list[int]:
        """Token ids of the first prompt: the system text and the user message ``text``,
        up to the assistant's generation prompt (:meth:`PromptEncoder.encode`)."""
        return self.encoder.encode(text)

    def user_turn(self, text: str) -> list[int]:
        """The tokens of one more user message ``text`` after a closed assistant turn, up
        to the next generation prompt (tokenized once, on their own)."""
        if not self.chat:
            return self._encode(f"\n\n{text}")
        rest = self._after_answer(_render(self.tokenizer, self._probe + [{"role": "user", "content": text}], True))
        if not rest.startswith(self.close_text):
            raise TemplateError(f"the chat template closes an assistant message with {self.close_text!r} before one "
                                f"user message but writes {rest[:len(self.close_text) + 20]!r} before another; use "
                                "rollout.episode_format=memory with it")
        return self._encode(rest[len(self.close_text):])

    def closing(self, answer: Sequence[int]) -> list[int]:
        """The closing tokens the sampled ``answer`` still lacks: all of :attr:`close_ids`
        after a stop string or the token limit, the rest of them after an answer that
        ends with their beginning (a sampled end-of-turn token)."""
        close = self.close_ids
        for k in range(min(len(close), len(answer)), 0, -1):
            if list(answer[-k:]) == close[:k]:
                return close[k:]
        return list(close)

    def extend(self, ids: Sequence[int], answer: Sequence[int], text: str) -> list[int]:
        """The next prompt: ``ids`` (the last prompt), the sampled ``answer`` as it is, its
        missing closing tokens and the user message ``text``."""
        return [*ids, *answer, *self.closing(answer), *self.user_turn(text)]


def is_prefix(shorter: Sequence[int], longer: Sequence[int]) -> bool:
    return len(shorter) <= len(longer) and list(longer[: len(shorter)]) == list(shorter)


def first_message(instruction: str, observation: str) -> str:
    """The first user message of an episode: the task, then the first observation."""
    return f"{instruction}\n\n{observation}" if instruction else observation


NO_ACTION_NOTE = "Your answer had no valid action; the state did not change."


def next_message(observation: str, had_action: bool) -> str:
    """A later user message: the observation after the turn (after an answer without a
    parseable action, the unchanged observation with a note saying so)."""
    return observation if had_action else f"{NO_ACTION_NOTE}\n\n{observation}"
