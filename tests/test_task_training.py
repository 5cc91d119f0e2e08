"""Three training steps on every shipped task, through the command-line config and the
environment worker processes, as a user runs them (``env=NAME``)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

SMALL = ["algo.group_size=4", "trainer.total_steps=3", "trainer.tasks_per_step=2", "trainer.eval_episodes=2",
         "trainer.warmup.steps=5", "trainer.warmup.episodes=10", "model.tiny_hidden_size=64", "model.tiny_num_heads=1",
         "model.tiny_num_kv_heads=1", "logger.wandb=false", "logger.progress_bar=false", "logger.plot=false",
         "trainer.save_final=false"]


def train(tmp_path, overrides):
    from hydra import compose, initialize_config_module

    from grpo_lab.train import build_config
    from grpo_lab.trainer import Trainer

    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        config = build_config(compose(config_name="config", overrides=overrides + SMALL))
    out = tmp_path / "run"
    summary = Trainer(config, output_dir=out).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "eval_final" in summary
    assert all(r["num_rows"] > 0 and r["response_tokens"] > 0 for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)  # steps whose groups all tie make no update
    assert sum(r.get("episodes_dropped", 0) for r in rows) == 0
    return summary, rows


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["env=countdown"],
    ["env=search_qa", "env.max_steps=3"],
    ["env=frozenlake", "env.kwargs.is_slippery=true", "env.kwargs.map_mode=random"],
], ids=["countdown", "search_qa", "frozenlake_slippery"])
def test_three_training_steps(tmp_path, overrides):
    train(tmp_path, overrides)


@pytest.mark.slow
def test_three_training_steps_on_a_local_dataset_with_a_reward_module(tmp_path, monkeypatch, caplog):
    rows = [{"question": f"What is {a}+{b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sum_rewards.py").write_text(textwrap.dedent("""
        def digits(prompt, completion, row):
            return float(any(ch.isdigit() for ch in completion))
    """))
    monkeypatch.chdir(tmp_path)  # reward modules import from the working directory, in the workers too
    with caplog.at_level("INFO", logger="grpo_lab"):
        summary, metrics = train(tmp_path, ["env=dataset", "env.kwargs.path=sums.jsonl", "env.kwargs.prompt_column=question",
                                            "env.kwargs.rewards=[exact_match,sum_rewards:digits]",
                                            "env.kwargs.reward_weights=[1.0,0.1]", "rollout.max_new_tokens=8"])
    assert "warm-up skipped: environment 'dataset' has no legal actions" in caplog.text
    assert all(r["invalid_action_rate"] < 1 for r in metrics)  # whole completions reach the rewards
    for r in metrics:  # each reward function's mean is logged, and they add up to the return with their weights
        assert 0 <= r["reward/exact_match"] <= 1 and 0 <= r["reward/sum_rewards:digits"] <= 1
        assert r["reward_mean"] == pytest.approx(r["reward/exact_match"] + 0.1 * r["reward/sum_rewards:digits"], abs=1e-6)
