"""``env=dataset``: rows from local JSONL, Parquet and saved datasets, reward functions
named ``module:function`` that see the whole row, weighted sums, the built-in rewards,
and clear errors for bad columns, paths and rewards."""

from __future__ import annotations

import json
import textwrap

import pytest

from grpo_lab.envs import make_env
from grpo_lab.envs.dataset import DatasetEnv, load_rows, prompt_rows
from grpo_lab.envs.rewards import exact_match, final_answer, format_reward, math_answer
from grpo_lab.rollout.demonstrations import format_demonstrations, prompt_corpus

ROWS = [{"question": "What is 2+3?", "answer": "5", "level": 1},
        {"question": "What is 7*6?", "answer": "42", "level": 2},
        {"question": "What is half of 1?", "answer": "\\frac{1}{2}", "level": 3}]


def clear_caches():
    load_rows.cache_clear()
    prompt_rows.cache_clear()


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

        def as_text(prompt, completion, row):
            return "1.0"

        def raises(prompt, completion, row):
            return 1 / 0
    """))
    monkeypatch.chdir(tmp_path)
    clear_caches()
    yield path
    clear_caches()


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


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("reward, kind, message", [
    ("broken", "nonfinite", r"nonfinite: reward nan \(reward 'my_rewards:broken' returned nan\)"),
    ("as_text", "error", r"error: ValueError: reward 'my_rewards:as_text' returned '1.0' \(str\), not a number"),
    ("raises", "error", r"error: ValueError: reward 'my_rewards:raises' raised ZeroDivisionError: division by zero"),
])
def test_a_faulty_reward_fails_its_episode_as_its_kind_naming_the_function(data, workers, reward, kind, message):
    """A NaN is a non-finite reward (counted as env_nonfinite_rewards), text is not a
    number and a raise is an error (env_errors); every fault line names the function,
    in process and in a worker process."""
    from grpo_lab.rollout.env_pool import EnvFault, EnvRunner, EnvSpec
    from grpo_lab.rollout.faults import FaultLog

    spec = EnvSpec.from_registry("dataset", dict(path=str(data), prompt_column="question",
                                                 rewards=["exact_match", f"my_rewards:{reward}"]))
    runner = EnvRunner(spec, workers=workers, step_timeout_s=30)
    try:
        env = runner()
        env.reset(0)
        with pytest.raises(EnvFault, match=message) as err:
            env.step("5")
    finally:
        runner.close()
    assert err.value.kind == kind
    faults = FaultLog()
    faults.record(err.value)
    counted = {"nonfinite": "env_nonfinite_rewards", "error": "env_errors"}[kind]
    assert faults.metrics()[counted] == 1 and faults.episodes_dropped == 1


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
    with pytest.raises(ValueError, match=r"env.kwargs.answer_column='gold' is not a column.*\['exact_match'\]"):
        DatasetEnv(path=str(data), prompt_column="question", answer_column="gold")


def test_conversation_prompts_take_the_system_text_first(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"}
    path.write_text(json.dumps(row) + "\n")
    clear_caches()
    env = DatasetEnv(path=str(path))
    assert env.reset(0).text == "Be brief.\n\n2+2?"
    path.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "hi"}], "answer": "4"}) + "\n")
    clear_caches()
    with pytest.raises(ValueError, match=r"rows \[0\].*\[system\?, user\].*\['assistant'\]"):
        DatasetEnv(path=str(path))  # refused when the data loads, naming the row


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


def test_empty_prompts_are_refused_when_the_data_loads_naming_the_rows(tmp_path):
    rows = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "", "answer": "0"}, {"prompt": "  \n", "answer": "1"},
            {"prompt": "3+3?", "answer": "6"}]
    path = tmp_path / "holes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clear_caches()
    with pytest.raises(ValueError, match=r"prompt_column='prompt'.*2 of 4 rows have an empty prompt, rows \[1, 2\]"):
        DatasetEnv(path=str(path))


def test_a_missing_local_file_is_named_at_once_not_tried_on_the_hub(tmp_path, monkeypatch):
    """A path with a data-file ending (or a separator) that does not exist is an immediate
    error naming env.kwargs.path; it never reaches the hub's retries."""
    import time

    monkeypatch.chdir(tmp_path)
    clear_caches()
    for path in ("missing.jsonl", "data/missing.parquet", "./nowhere", "~/nothing/here.csv"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"env.kwargs.path={path!r}: no such file or directory"):
            DatasetEnv(path=path)
        assert time.perf_counter() - start < 5
