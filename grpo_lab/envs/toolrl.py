"""ToolRL's rewards for tool calls: a format reward and a fine-grained correctness reward.

Qian et al. 2025, "ToolRL: Reward is All Tool Learning Needs" (official code
``qiancheng0/ToolRL``, ``verl/utils/reward_score/rlla.py``). A completion is
``<think>...</think>`` followed by ``<tool_call>`` (one JSON call per line, each
``{"name": ..., "parameters": {...}}``) and/or ``<response>...</response>``; the
ground truth has the same form.

- **Format** (in ``[0, 1]``): 1 when the completion has exactly the structure the ground
  truth has (think, then the tool call block and/or the response, each once), else 0.
- **Correctness** (in ``[-3, 3]``): for a ground truth with tool calls, an exact match of
  the call lists scores 3; otherwise the score is

      S = match(names) + sum over ground-truth calls g of the best unused predicted call p
          with g's name: match(param names of g, of p) + #{params of g whose value p has},

  over its maximum ``1 + sum_g (1 + |params of g|)``, mapped linearly onto ``[-3, 3]``.
  ``match(a, b) = |a ∩ b| / (|a| + |b| - |a ∩ b|)`` with multiplicities (1 for equal
  lists, 0 when either is empty). A missing or unparsable call block scores -3. A ground
  truth without tool calls scores 0 (the official code's choice).
- **Total**: format + correctness, in ``[-3, 4]`` (the paper's reward).

The paper's reward-scale schedule (``SCHEDULEREWARD``: over 150 steps the correctness
bounds widen from ``[-2, 2]`` to ``[-3, 3]`` and the format's narrow from ``[-2, 2]`` to
``[-1, 1]``) is :func:`scheduled_bounds`. The optional length reward is not built.
Departure, stated: the official code compares whole JSON objects for an exact match; here
calls compare after their ``parameters`` (or OpenAI's ``arguments``) are read, so the two
spellings of the same call match.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Sequence

CORRECT_MAX, CORRECT_MIN = 3.0, -3.0
TOOL_BLOCK_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def match_score(a: Sequence[Any], b: Sequence[Any]) -> float:
    """``|a ∩ b| / (|a| + |b| - |a ∩ b|)`` with multiplicities, order ignored (1 for equal
    lists, 0 when either is empty)."""
    if list(a) == list(b):
        return 1.0
    if not a or not b:
        return 0.0
    ca, cb = Counter(map(_hashable, a)), Counter(map(_hashable, b))
    common = sum(min(ca[k], cb[k]) for k in ca.keys() & cb.keys())
    return common / (len(a) + len(b) - common)


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def normalise_call(call: Any) -> dict[str, Any]:
    """``{"name", "parameters"}`` of a call written as ToolRL's (``parameters``) or as the
    OpenAI API returns it (``{"function": {"name", "arguments": "<json>"}}``, or the
    ``openai`` client's tool-call object, read through its ``model_dump``)."""
    if hasattr(call, "model_dump"):
        call = call.model_dump()
    if isinstance(call, dict) and "function" in call and isinstance(call["function"], dict):
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f"a tool call needs a name: {call!r}")
    params = call.get("parameters", call.get("arguments", {}))
    if isinstance(params, str):
        params = json.loads(params) if params.strip() else {}
    if not isinstance(params, dict):
        raise ValueError(f"a tool call's parameters must be an object: {call!r}")
    return {"name": call["name"], "parameters": params}


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The calls of the first ``<tool_call>`` block of ``text``, one JSON object per line;
    ``ValueError`` when there is none or a line is not a call."""
    found = TOOL_BLOCK_RE.search(text)
    if found is None:
        raise ValueError("no <tool_call> block")
    lines = [line for line in found.group(1).strip().split("\n") if line.strip()]
    try:
        return [normalise_call(json.loads(line)) for line in lines]
    except json.JSONDecodeError as err:
        raise ValueError(f"a tool call is not JSON: {err}") from None


def tool_call_score(gold: Sequence[dict], predicted: Sequence[dict], high: float = CORRECT_MAX,
                    low: float = CORRECT_MIN) -> float:
    """The correctness reward of ``predicted`` calls against ``gold`` (module docstring),
    in ``[low, high]``."""
    gold = [normalise_call(c) for c in gold]
    predicted = [normalise_call(c) for c in predicted]
    if gold == predicted:
        return high
    score = match_score([g["name"] for g in gold], [p["name"] for p in predicted])
    best_possible = 1.0
    used: set[int] = set()
    for g in gold:
        best_possible += 1.0 + len(g["parameters"])
        best, best_index = 0.0, -1
        for i, p in enumerate(predicted):
            if i in used or p["name"] != g["name"]:
                continue
            names = match_score(list(g["parameters"]), list(p["parameters"]))
            values = sum(1.0 for k, v in g["parameters"].items() if k in p["parameters"] and p["parameters"][k] == v)
            if names + values > best:
                best, best_index = names + values, i
        if best_index >= 0:
            used.add(best_index)
            score += best
    return (high - low) * score / best_possible + low


def format_score(completion: str, gold: str) -> float:
    """1.0 when ``completion`` has the structure of ``gold`` (think, then a tool call block
    and/or a response, each once), else 0.0."""
    has_call, has_response = "<tool_call>" in gold, "<response>" in gold
    once = all(completion.count(tag) == 1 for tag in (["<tool_call>", "</tool_call>"] if has_call else [])
               + (["<response>", "</response>"] if has_response else []))
    if has_call and has_response:
        pattern = r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>\n<response>.*?</response>$"
    elif has_call:
        pattern = r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>$"
    elif has_response:
        pattern = r"^<think>.*?</think>\n<response>.*?</response>$"
    else:
        pattern, once = r"^<think>.*?</think>$", True
    return float(once and re.search(pattern, completion, re.DOTALL) is not None)


def correctness_score(completion: str, gold: str, high: float = CORRECT_MAX, low: float = CORRECT_MIN) -> float:
    """The correctness reward of ``completion``'s tool calls against ``gold``'s: 0 when
    ``gold`` has none, ``low`` when the completion's block is missing or malformed."""
    if "<tool_call>" not in gold:
        return 0.0
    expected = parse_tool_calls(gold)
    try:
        predicted = parse_tool_calls(completion)
    except (ValueError, TypeError):
        return low
    return tool_call_score(expected, predicted, high, low)


def scheduled_bounds(step: int, horizon: int = 150) -> tuple[tuple[float, float], tuple[float, float]]:
    """ToolRL's reward-scale schedule (``SCHEDULEREWARD``): ``((format_low, format_high),
    (correct_low, correct_high))`` at ``step``: the format's range narrows from ``[-2, 2]``
    toward ``[-1, 1]`` (its bounds stop at -1 and 1) and the correctness range widens from
    ``[-2, 2]`` to ``[-3, 3]`` over ``horizon`` steps."""
    f = step / horizon
    format_high = max(2 - (2 - 1.0) * f, 1.0)
    format_low = min(-2 + (2 + 0.0) * f, -1.0)
    correct_high = min((CORRECT_MAX - 2) * f + 2, CORRECT_MAX)
    correct_low = max((CORRECT_MIN + 2) * f - 2, CORRECT_MIN)
    return (format_low, format_high), (correct_low, correct_high)
