"""``env=tool_calls``: generated function-calling tasks scored with ToolRL's rewards (the
ground truth scores 4 and wins; the exact-match mode; tasks that need no call), ToolRL's
released data format, and a training run from the command-line config."""

from __future__ import annotations

import json

import pytest

from grpo_lab.envs import make_env
from grpo_lab.envs.tool_calls import generate_tasks, load_toolrl


def test_the_ground_truth_scores_the_maximum_and_wins():
    env = make_env("tool_calls", num_tasks=60)
    kinds = set()
    for seed in range(60):
        obs = env.reset(seed)
        system, user, gold = env.tasks[env.index]
        assert obs.text.endswith(f"User: {user}") and "Tools:" in obs.text
        for line in gold.split("\n"):
            if line.startswith("{"):
                assert json.loads(line)["name"] in obs.text  # the tools it needs are shown
        result = env.step(gold)
        assert result.reward == pytest.approx(4.0 if "<tool_call>" in gold else 1.0) and result.info["won"]
        kinds.add(gold.count("\n{") if "<tool_call>" in gold else 0)
    assert kinds == {0, 1, 2}  # no call, one call, two calls


def test_exact_mode_and_a_wrong_answer():
    env = make_env("tool_calls", num_tasks=60, reward="exact")
    seed = next(s for s in range(60) if "<tool_call>" in env.tasks[s % 60][2])
    env.reset(seed)
    wrong = env.legal_actions()[0]
    result = env.step(wrong)
    assert result.reward == float(result.info["won"]) and result.info["rewards"]["format"] == 1.0
    env.reset(seed)
    assert env.step("no think, no call").info == {"won": False, "valid_action": False,
                                                  "rewards": {"format": 0.0, "correctness": -3.0}}


def test_tasks_are_a_function_of_the_seed():
    assert generate_tasks(20, 3) == generate_tasks(20, 3) and generate_tasks(20, 3) != generate_tasks(20, 4)


def test_toolrls_released_format_loads(tmp_path):
    rows = [{"instruction": "You are a tool user.", "input": "weather in Oslo", "output":
             "<think>x</think>\n<tool_call>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}\n</tool_call>"}]
    path = tmp_path / "rlla_rl.json"
    path.write_text(json.dumps(rows))
    env = make_env("tool_calls", data_path=str(path))
    assert env.reset(0).text == "You are a tool user.\nUser: weather in Oslo"
    assert env.step(rows[0]["output"]).info["won"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl entry 0: missing \['instruction', 'output'\]"):
        load_toolrl(str(tmp_path / "bad.jsonl"))


@pytest.mark.slow
def test_a_training_run_logs_the_reward_parts(tmp_path):
    from training_runs import SMALL_RUN, train_rows

    rows = train_rows(tmp_path / "run", ["env=tool_calls", "algo.group_size=4", "trainer.total_steps=2",
                                         "trainer.tasks_per_step=2", *SMALL_RUN])
    assert len(rows) == 2 and all("reward/format" in r and "reward/correctness" in r for r in rows)
    assert all(-3.0 <= r["reward/correctness"] <= 3.0 for r in rows)
