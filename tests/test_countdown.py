"""Countdown: exact evaluation of answers over the offered numbers, solvable generated
tasks, the reward and validity rules, and determinism in the seed."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_lab.envs import make_env
from grpo_lab.envs.countdown import CountdownEnv, InvalidExpression, evaluate, generate_tasks, make_task


@pytest.mark.parametrize("expression, numbers, value", [
    ("(7 - 3) * 5", (7, 3, 5), 20),
    ("7-3*5", (7, 3, 5), -8),  # precedence as in arithmetic
    ("(1/3)*3", (1, 3, 3), 1),  # exact: no floating point
    ("8 / 3", (8, 3), Fraction(8, 3)),
    ("5", (5, 9), 5),  # fewer numbers than offered
])
def test_valid_expressions_evaluate_exactly(expression, numbers, value):
    assert evaluate(expression, numbers) == value


@pytest.mark.parametrize("expression, numbers, message", [
    ("7 * 7", (7, 3), r"uses \[7\] beyond"),  # a number twice
    ("4 + 1", (7, 3), r"uses \[1, 4\] beyond"),  # numbers not offered
    ("2 ** 3", (2, 3), "only integers"),
    ("-3 + 5", (3, 5), "only integers"),  # unary minus is not an operation on the numbers
    ("3.5 * 2", (3, 2), "only integers"),
    ("3 / (2 - 2)", (3, 2, 2), "division by zero"),
    ("3 +", (3,), "not an arithmetic expression"),
    ("__import__('os')", (1,), "only integers"),
])
def test_invalid_expressions_are_refused_with_the_reason(expression, numbers, message):
    with pytest.raises(InvalidExpression, match=message):
        evaluate(expression, numbers)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 5), st.integers(2, 30))
def test_every_generated_task_is_solved_by_its_solution(seed, num_numbers, max_number):
    task = make_task(random.Random(seed), num_numbers, max_number, 200)
    assert len(task["numbers"]) == num_numbers and all(1 <= n <= max_number for n in task["numbers"])
    assert evaluate(task["solution"], tuple(task["numbers"])) == task["target"]
    assert 1 <= task["target"] <= 200


def test_tasks_are_a_dataset_and_the_same_for_the_same_seed():
    a, b = generate_tasks(20, seed=3), generate_tasks(20, seed=3)
    assert a.column_names == ["numbers", "target", "solution"] and a.to_list() == b.to_list()
    assert generate_tasks(20, seed=4).to_list() != a.to_list()


def test_a_correct_answer_wins_a_wrong_one_is_valid_and_a_bad_one_is_not():
    env = CountdownEnv(num_tasks=50)
    env.reset(11)
    numbers, target = env.numbers, env.target
    solution = generate_tasks(50)[11]["solution"]
    won = env.step(solution)
    assert won.reward == 1.0 and won.done and won.info == {"won": True, "valid_action": True}
    env.reset(11)
    wrong = next(str(n) for n in numbers if n != target)  # one number alone, not the target
    lost = env.step(wrong)
    assert lost.done and lost.reward == 0.0 and lost.info == {"won": False, "valid_action": True}
    env.reset(11)
    bad = env.step("the answer is 12")
    assert bad.done and bad.reward == 0.0 and bad.info == {"won": False, "valid_action": False}
    assert "invalid" in bad.observation.text


def test_format_reward_pays_valid_wrong_answers_only():
    env = CountdownEnv(num_tasks=50, format_reward=0.1)
    env.reset(0)
    wrong = next(e for e in env.legal_actions() + [str(env.numbers[0])] if evaluate(e, env.numbers) != env.target)
    assert env.step(wrong).reward == pytest.approx(0.1)
    env.reset(0)
    assert env.step("nonsense").reward == 0.0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_a_seed_gives_one_task_and_legal_actions_are_well_formed(seed):
    env = make_env("countdown", num_tasks=100)
    first = env.reset(seed)
    actions = env.legal_actions()
    assert env.reset(seed) == first and env.legal_actions() == actions
    assert first.anchor == (env.numbers, env.target)
    for expression in actions:
        evaluate(expression, env.numbers)  # raises if not well-formed
    assert env.text_format.parse(env.text_format.format(actions[0])) == actions[0]


def test_stepping_a_finished_episode_raises_and_bad_options_name_their_value():
    env = CountdownEnv(num_tasks=5)
    env.reset(0)
    env.step("1")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("1")
    with pytest.raises(ValueError, match="num_numbers must be >= 2, got 1"):
        CountdownEnv(num_numbers=1)
