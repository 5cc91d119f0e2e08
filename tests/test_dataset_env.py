"""``env=dataset``: rows from local JSONL, Parquet and saved datasets, reward functions
named ``module:function`` that see the whole row, weighted sums, the built-in rewards,
and clear errors for bad columns, paths and rewards."""

from __future__ import annotations

import json
import textwrap

import pytest

from grpo_lab.envs import make_env
from grpo_lab.envs.dataset import DatasetEnv, load_rows
from grpo_lab.envs.rewards import exact_match, final_answer, format_reward, math_answer
from grpo_lab.training.warmup import format_demonstrations, prompt_corpus

ROWS = [{"question": "What is 2+3?", "answer": "5", "level": 1},
        {"question": "What is 7*6?", "answer": "42", "level": 2},
        {"question": "What is half of 1?", "answer": "\\frac{1}{2}", "level": 3}]


@pytest.fixture()
def data(tmp_path, monkeypatch):
    """A JSONL file and a reward module in the working directory."""
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def by_level(prompt, completion, row):
            return float(row["level"])  # another column of the row

        def echo_prompt(prompt, completion, row):
            return float(prompt == row["question"])

        def broken(prompt, completion, row):
            return float("nan")
    """))
    monkeypatch.chdir(tmp_path)
    load_rows.cache_clear()
    yield path
    load_rows.cache_clear()


def test_a_row_is_the_prompt_and_rewards_see_the_prompt_and_every_column(data):
    env = make_env("dataset", path=str(data), prompt_column="question",
                   rewards=["exact_match", "my_rewards:by_level", "my_rewards:echo_prompt"], reward_weights=[1.0, 0.5, 2.0])
    obs = env.reset(4)  # row 4 % 3 = 1
    assert obs.text == "What is 7*6?" and obs.anchor == ("row", 1)
    result = env.step("<answer>42</answer>")
    assert result.info["rewards"] == {"exact_match": 1.0, "my_rewards:by_level": 2.0, "my_rewards:echo_prompt": 1.0}
    assert result.reward == pytest.approx(1.0 + 0.5 * 2.0 + 2.0 * 1.0) and result.done
    assert result.info["won"] and result.info["valid_action"]


def test_parquet_and_saved_datasets_load_like_jsonl(data, tmp_path):
    from datasets import Dataset

    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "qa.parquet"))
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "qa.parquet", tmp_path / "saved", data):
        env = DatasetEnv(path=str(path), prompt_column="question")
        assert [env.reset(i).text for i in range(3)] == [r["question"] for r in ROWS]


def test_a_reward_that_is_not_finite_fails_the_episode_by_name(data):
    env = make_env("dataset", path=str(data), prompt_column="question", rewards=["my_rewards:broken"])
    env.reset(0)
    with pytest.raises(ValueError, match="my_rewards:broken.*nan"):
        env.step("5")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_column="q"), r"prompt_column='q' is not a column .*\['question', 'answer', 'level'\]"),
    (dict(prompt_column="question", rewards=["nowhere_module:f"]), "no module 'nowhere_module'"),
    (dict(prompt_column="question", rewards=["my_rewards:missing"]), "has no function 'missing'"),
    (dict(prompt_column="question", rewards=["bogus"]), "neither a built-in"),
    (dict(prompt_column="question", rewards=["exact_match", "format"], reward_weights=[1.0]), "1 entries for 2 rewards"),
])
def test_bad_options_are_refused_naming_the_bad_value(data, kwargs, message):
    with pytest.raises((ValueError, ImportError), match=message):
        DatasetEnv(path=str(data), **kwargs)


def test_missing_paths_and_answer_columns_are_named(data, tmp_path):
    with pytest.raises(ValueError, match="needs env.kwargs.path"):
        DatasetEnv()
    with pytest.raises(ValueError, match="nothing_here.jsonl"):
        DatasetEnv(path=str(tmp_path / "nothing_here.jsonl"))
    env = DatasetEnv(path=str(data), prompt_column="question", answer_column="gold")
    env.reset(0)
    with pytest.raises(KeyError, match="'gold'"):
        env.step("5")


def test_conversation_prompts_take_the_system_text_first(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"}
    path.write_text(json.dumps(row) + "\n")
    load_rows.cache_clear()
    env = DatasetEnv(path=str(path))
    assert env.reset(0).text == "Be brief.\n\n2+2?"
    path.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "hi"}], "answer": "4"}) + "\n")
    load_rows.cache_clear()
    env = DatasetEnv(path=str(path))
    with pytest.raises(ValueError, match=r"\[system\?, user\].*\['assistant'\]"):
        env.reset(0)


@pytest.mark.parametrize("completion, gold, expected", [
    ("<answer> Paris. </answer>", "paris", 1.0),
    ("It is \\boxed{42}", "42", 1.0),
    ("I think 42", "42", 0.0),  # no answer element: the whole completion is compared
    ("<answer>x</answer><answer>Rome</answer>", ["Paris", "Rome"], 1.0),  # the last element; any gold
])
def test_exact_match(completion, gold, expected):
    assert exact_match("", completion, {"answer": gold}) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    ("so the result is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
    ("\\boxed{2/4}", "1/2", 1.0),
    ("\\boxed{3}", "\\frac{1}{2}", 0.0),
    ("no number here", "7", 0.0),
])
def test_math_answers_are_compared_by_value(completion, gold, expected):
    assert math_answer("", completion, {"answer": gold}) == expected


@pytest.mark.parametrize("completion, expected", [
    ("<answer>4</answer>", 1.0),
    ("<think>2+2</think>\n<answer>4</answer>", 1.0),
    ("The answer: <answer>4</answer>", 0.0),
    ("<answer>4</answer><answer>5</answer>", 0.0),
    ("<answer> </answer>", 0.0),
    ("4", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward("", completion, {}) == expected


def test_final_answer_prefers_the_answer_element_then_boxed():
    assert final_answer("\\boxed{1} <answer>2</answer>") == "2"
    assert final_answer("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert final_answer("plain") == "plain"


def test_no_demonstrations_but_a_prompt_corpus(data):
    factory = lambda: DatasetEnv(path=str(data), prompt_column="question")  # noqa: E731
    assert list(format_demonstrations(factory, 5, 1, 0, seed=0)) == []
    corpus = list(prompt_corpus(factory, 6, seed=0))
    assert len(corpus) == 6 and set(corpus) <= {r["question"] for r in ROWS}
    assert corpus == list(prompt_corpus(factory, 6, seed=0))  # the same for the same seed
