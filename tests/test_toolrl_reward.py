"""ToolRL's rewards by hand (Qian et al. 2025): the frequency-aware match, the fine-grained
correctness reward of names, parameter names and values mapped onto [-3, 3], the format
reward against the ground truth's structure, the OpenAI tool-call spelling, and the
built-in rewards of env=dataset."""

from __future__ import annotations

import json

import pytest

from grpo_lab.envs.rewards import combine
from grpo_lab.envs.toolrl import (correctness_score, format_score, match_score, normalise_call, scheduled_bounds,
                                  tool_call_score)


def call(name, **params):
    return {"name": name, "parameters": params}


def block(*calls):
    return "<tool_call>\n" + "\n".join(json.dumps(c) for c in calls) + "\n</tool_call>"


def test_match_score_counts_multiplicities_and_ignores_order():
    assert match_score(["a", "b"], ["b", "a"]) == pytest.approx(1.0)  # 2 / (2 + 2 - 2)
    assert match_score(["a", "a"], ["a"]) == pytest.approx(0.5)  # 1 / (2 + 1 - 1)
    assert match_score(["a", "b"], ["b", "c"]) == pytest.approx(1 / 3)
    assert match_score([], ["a"]) == 0.0 and match_score([], []) == 1.0


def test_correctness_by_hand():
    """One call, right name and parameter names, one value of two: S = 1 + (1 + 1) of a
    maximum 1 + (1 + 2) = 4: 6 * 3 / 4 - 3 = 1.5."""
    gold = [call("get_weather", city="Paris", unit="C")]
    assert tool_call_score(gold, [call("get_weather", city="Paris", unit="F")]) == pytest.approx(1.5)
    assert tool_call_score(gold, gold) == 3.0


def test_correctness_with_a_missing_and_an_extra_call_by_hand():
    """Gold A(x), B(y, z); predicted B(y), C(w): names 1/3; A unmatched; B: names 1/2,
    one value: 1.5. S = 11/6 of 1 + 2 + 3 = 6: 6 * (11/6) / 6 - 3 = -7/6."""
    gold = [call("A", x=1), call("B", y=2, z=3)]
    assert tool_call_score(gold, [call("B", y=2), call("C", w=0)]) == pytest.approx(-7 / 6)


def test_a_predicted_call_matches_one_gold_call_only():
    """Gold A(x=1) twice, predicted once: names 1/2, the first gold call takes it (2), the
    second finds none: S = 2.5 of 1 + 2 + 2 = 5: 0."""
    assert tool_call_score([call("A", x=1), call("A", x=1)], [call("A", x=1)]) == pytest.approx(0.0)


def test_completions_and_their_failures():
    gold = "<think>.</think>\n" + block(call("search", q="rl"))
    assert correctness_score("<think>ok</think>\n" + block(call("search", q="rl")), gold) == 3.0
    assert correctness_score("<think>ok</think> no call", gold) == -3.0
    assert correctness_score("<tool_call>\n{not json}\n</tool_call>", gold) == -3.0
    assert correctness_score("<tool_call>\n{\"name\": \"search\"}\n</tool_call>", "<response>hi</response>") == 0.0


def test_format_follows_the_ground_truths_structure():
    only_call = block(call("search", q="rl"))
    good = "<think>plan</think>\n" + only_call
    assert format_score(good, only_call) == 1.0
    assert format_score(good + "\n<response>x</response>", only_call) == 0.0
    both = only_call + "\n<response>done</response>"
    assert format_score(good + "\n<response>done</response>", both) == 1.0
    assert format_score("<think>a</think>\n<response>hi</response>", "<response>hello</response>") == 1.0
    assert format_score("<response>hi</response>", "<response>hello</response>") == 0.0  # no think


def test_the_openai_spelling_of_a_call_scores_the_same():
    returned = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "F"})}}
    assert normalise_call(returned) == call("get_weather", city="Paris", unit="F")
    assert tool_call_score([call("get_weather", city="Paris", unit="C")], [returned]) == pytest.approx(1.5)
    from openai.types.chat import ChatCompletionMessageToolCall  # what the client's message.tool_calls holds

    parsed = ChatCompletionMessageToolCall.model_validate(returned)
    assert tool_call_score([call("get_weather", city="Paris", unit="C")], [parsed]) == pytest.approx(1.5)


def test_the_schedule_by_hand():
    assert scheduled_bounds(0) == ((-2.0, 2.0), (-2.0, 2.0))
    assert scheduled_bounds(75) == ((-1.0, 1.5), (-2.5, 2.5))
    assert scheduled_bounds(300) == ((-1.0, 1.0), (-3.0, 3.0))


def test_the_built_in_rewards_of_the_dataset_task():
    total = combine(["toolrl", "toolrl_format", "toolrl_correctness"], None, "answer")
    row = {"answer": "<think>x</think>\n" + block(call("get_weather", city="Paris", unit="C"))}
    completion = "<think>weather</think>\n" + block(call("get_weather", city="Paris", unit="F"))
    value, parts = total("prompt", completion, row)
    assert parts == {"toolrl": pytest.approx(2.5), "toolrl_format": 1.0, "toolrl_correctness": pytest.approx(1.5)}
    assert value == pytest.approx(5.0)
