"""Reward functions for single-turn tasks, and how they are named in a config.

A reward function takes ``(prompt, completion, row)`` (the prompt text, the model's
whole answer, and the dataset row as a dict with every column) and returns a float.
A config names it as ``package.module:function`` (importable from the working directory
or ``PYTHONPATH``) or by a built-in name:

- ``exact_match``: 1 when the answer equals ``row[answer_column]`` after normalisation
  (case, surrounding whitespace and punctuation, inner runs of spaces), else 0. The
  answer is the text of the last ``<answer>...</answer>`` when there is one, else the
  last ``\\boxed{...}``, else the whole completion.
- ``math``: 1 when ``math-verify`` finds the completion's final answer (LaTeX or plain,
  ``\\boxed{}`` first) mathematically equal to ``row[answer_column]``, else 0.
- ``format``: 1 when the completion holds exactly one ``<answer>...</answer>`` with
  something in it (after an optional ``<think>...</think>``), else 0.
- ``toolrl``, ``toolrl_format``, ``toolrl_correctness``: ToolRL's tool-call rewards
  against the ground truth in ``row[answer_column]`` (``<tool_call>`` lines of JSON
  and/or a ``<response>``): the format reward in [0, 1], the fine-grained correctness
  reward in [-3, 3], and their sum (:mod:`grpo_lab.envs.toolrl`).

Several functions add up with weights (:func:`combine`).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import string
import sys
from typing import Any, Callable, Mapping, Sequence

from ..registry import Registry
from . import toolrl

RewardFn = Callable[[str, str, Mapping[str, Any]], float]

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"^\s*(<think>.*?</think>\s*)?<answer>(?!\s*</answer>)(?:(?!<answer>).)*?</answer>\s*$", re.DOTALL)


def final_answer(completion: str) -> str:
    """The answer part of a completion: the last ``<answer>`` element's text, else the
    last ``\\boxed{...}`` (balanced braces), else the whole completion."""
    tagged = ANSWER_RE.findall(completion)
    if tagged:
        return tagged[-1]
    boxed = last_boxed(completion)
    return boxed if boxed is not None else completion


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def normalize_text(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding whitespace and punctuation dropped."""
    return " ".join(str(text).lower().split()).strip(string.punctuation + " ")


def _gold(row: Mapping[str, Any], column: str) -> Any:
    if column not in row:
        raise KeyError(f"the reward needs the answer column {column!r}, which the row lacks (columns: {sorted(row)}); "
                       "set env.kwargs.answer_column")
    return row[column]


def exact_match(prompt: str, completion: str, row: Mapping[str, Any], answer_column: str = "answer") -> float:
    """1.0 when the completion's final answer equals the gold answer (normalised); a list
    of gold answers accepts any of them."""
    gold = _gold(row, answer_column)
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    answer = normalize_text(final_answer(completion))
    return float(any(answer == normalize_text(g) for g in golds))


def math_answer(prompt: str, completion: str, row: Mapping[str, Any], answer_column: str = "answer") -> float:
    """1.0 when ``math-verify`` finds the completion's answer equal to the gold answer."""
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError("the 'math' reward needs math-verify: pip install math-verify") from err
    gold = str(_gold(row, answer_column))
    gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$")
    tagged = ANSWER_RE.findall(completion)
    answer_parsed = parse(tagged[-1] if tagged else completion)
    if not gold_parsed or not answer_parsed:
        return 0.0
    return float(verify(gold_parsed, answer_parsed))


def format_reward(prompt: str, completion: str, row: Mapping[str, Any], answer_column: str = "answer") -> float:
    """1.0 for ``[<think>...</think>] <answer>...</answer>`` and nothing else around it."""
    return float(FORMAT_RE.match(completion) is not None)


#: the built-in reward functions by name (``env.kwargs.rewards``); a user's are ``module:function``
BUILTIN_REWARDS: Registry[Callable[..., float]] = Registry("rewards", "env.kwargs.rewards", "built-in reward",
                                                           options=lambda fn: ("answer_column='answer'",))
BUILTIN_REWARDS.register("exact_match", exact_match)
BUILTIN_REWARDS.register("math", math_answer)
BUILTIN_REWARDS.register("format", format_reward)


def toolrl_format(prompt: str, completion: str, row: Mapping[str, Any], answer_column: str = "answer") -> float:
    """1.0 when the completion has the ground truth's structure (ToolRL's format reward)."""
    return toolrl.format_score(completion, str(_gold(row, answer_column)))


def toolrl_correctness(prompt: str, completion: str, row: Mapping[str, Any], answer_column: str = "answer") -> float:
    """Names, parameter names and values of the tool calls against the ground truth's, in [-3, 3] (ToolRL)."""
    return toolrl.correctness_score(completion, str(_gold(row, answer_column)))


def toolrl_reward(prompt: str, completion: str, row: Mapping[str, Any], answer_column: str = "answer") -> float:
    """ToolRL's reward: its format reward plus its tool-call correctness reward, in [-3, 4]."""
    gold = str(_gold(row, answer_column))
    return toolrl.format_score(completion, gold) + toolrl.correctness_score(completion, gold)


BUILTIN_REWARDS.register("toolrl", toolrl_reward)
BUILTIN_REWARDS.register("toolrl_format", toolrl_format)
BUILTIN_REWARDS.register("toolrl_correctness", toolrl_correctness)
#: the built-in rewards that read the row's answer column
ANSWER_REWARDS = ("exact_match", "math", "toolrl", "toolrl_format", "toolrl_correctness")


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """The function ``module:function`` names (``what`` says whose, in errors). The
    working directory is searched after ``sys.path``, as ``python -m`` would."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{what} {spec!r} is not 'module:function'")
    module_name, attribute = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if os.getcwd() in sys.path or err.name != module_name.split(".")[0]:
            raise ImportError(f"{what} {spec!r}: cannot import {module_name!r} ({err})") from err
        sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err2:
            raise ImportError(f"{what} {spec!r}: no module {module_name!r} on PYTHONPATH or in the working directory "
                              f"{os.getcwd()} ({err2})") from err2
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no function {attribute!r}")
    return fn


def resolve_reward(spec: str) -> Callable[..., float]:
    """The reward function named by ``spec``: a built-in name or ``module:function``
    (:func:`import_callable`)."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS.get(spec)
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward {spec!r} is neither a built-in ({BUILTIN_REWARDS.names()}) nor 'module:function'")
    return import_callable(spec, "reward")


def reward_value(spec: str, value: Any) -> float:
    """``value`` returned by reward ``spec`` as a float; raises ``ValueError`` naming the
    function when it is not a number (a string such as ``"1.0"`` included: a reward that
    returns text has a bug that ``float()`` would hide)."""
    if isinstance(value, (str, bytes, bytearray)) or not hasattr(value, "__float__"):
        raise ValueError(f"reward {spec!r} returned {value!r} ({type(value).__name__}), not a number")
    try:
        return float(value)
    except (TypeError, ValueError) as err:  # e.g. a tensor of several elements
        raise ValueError(f"reward {spec!r} returned {value!r}, not a number ({err})") from None


def combine(specs: Sequence[str], weights: Sequence[float] | None, answer_column: str) -> Callable[..., tuple[float, dict]]:
    """A function ``(prompt, completion, row) -> (total, {spec: reward})`` adding the named
    rewards with ``weights`` (all 1 when ``None``). A reward that raises, or returns
    something that is not a number, raises ``ValueError`` naming it; one that returns a
    non-finite number makes the total non-finite (the episode is dropped as a
    ``nonfinite`` fault, and the fault names the function through ``{spec: reward}``)."""
    if not specs:
        raise ValueError("rewards must name at least one reward function")
    weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(specs):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(specs)} rewards {list(specs)}")
    fns = [resolve_reward(s) for s in specs]
    builtin = [s in BUILTIN_REWARDS for s in specs]

    def total(prompt: str, completion: str, row: Mapping[str, Any]) -> tuple[float, dict]:
        parts = {}
        for spec, fn, is_builtin in zip(specs, fns, builtin):
            try:
                value = fn(prompt, completion, row, answer_column=answer_column) if is_builtin else fn(prompt, completion, row)
            except Exception as err:
                text = str(err).strip().splitlines()
                raise ValueError(f"reward {spec!r} raised {type(err).__name__}" + (f": {text[0]}" if text else "")) from err
            parts[spec] = reward_value(spec, value)
        if not all(math.isfinite(v) for v in parts.values()):
            return math.nan, parts
        return sum(w * parts[s] for s, w in zip(specs, weights)), parts

    return total
