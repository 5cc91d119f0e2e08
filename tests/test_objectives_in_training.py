"""Every policy loss, and the loss modifiers, through real training steps: the config a
user writes (``algo=NAME``), the sampler's rows, several passes per batch (so ratios
leave 1), and the loss's own metrics in ``metrics.jsonl``."""

from __future__ import annotations

import json
import math

import pytest

from grpo_lab.losses import POLICY_LOSSES

TINY = ["algo.group_size=4", "trainer.total_steps=2", "trainer.tasks_per_step=4", "trainer.eval_episodes=0",
        "model.tiny_hidden_size=32", "model.tiny_num_heads=1", "model.tiny_num_kv_heads=1", "model.tiny_num_layers=1",
        "model.tiny_intermediate_size=64", "logger.wandb=false", "logger.progress_bar=false", "logger.plot=false",
        "trainer.save_final=false", "env=dataset", "env.kwargs.path=sums.jsonl", "env.kwargs.prompt_column=question",
        "env.kwargs.rewards=[digit_rewards:digits]", "rollout.max_new_tokens=8"]


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """A sums dataset and a graded reward (the share of digits in the completion) that an
    untrained model's completions spread, so every group has a learning signal."""
    rows = [{"question": f"What is {a}+{b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "digit_rewards.py").write_text(
        "def digits(prompt, completion, row):\n"
        "    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)\n")
    monkeypatch.chdir(tmp_path)  # reward modules import from the working directory, in the workers too
    return tmp_path


def train(tmp_path, overrides: list[str]) -> list[dict]:
    from hydra import compose, initialize_config_module

    from grpo_lab.train import build_config
    from grpo_lab.trainer import Trainer

    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        config = build_config(compose(config_name="config", overrides=overrides + TINY))
    out = tmp_path / "run"
    Trainer(config, output_dir=out).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    return rows


#: a metric each loss reports, by its algo config
LOSS_CONFIGS = {"sapo": "gate_slope_mean", "vespo": "phi_seq_mean", "clip_cov": "cov_selected_frac",
                "kl_cov": "cov_selected_frac", "cispo": "clip_frac", "gmpo": "clip_frac_high"}


@pytest.mark.parametrize("algo", sorted(LOSS_CONFIGS))
def test_each_loss_trains_several_passes_from_its_algo_config(task_dir, algo):
    rows = train(task_dir, [f"algo={algo}", "trainer.epochs_per_batch=2", "trainer.minibatches_per_epoch=2"])
    trained = [r for r in rows if "loss" in r]
    assert trained, "no step had a learning signal"
    for r in trained:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["num_updates"] >= 1
        assert LOSS_CONFIGS[algo] in r


def test_every_registered_loss_has_an_algo_config_here():
    covered = {"sapo", "vespo", "clip_cov", "kl_cov", "cispo", "geo_mean", "ppo_clip", "reinforce"}
    assert set(POLICY_LOSSES.names()) <= covered, sorted(set(POLICY_LOSSES.names()) - covered)
