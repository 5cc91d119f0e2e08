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


def train(tmp_path, overrides: list[str], steps: int = 2, out_name: str = "run") -> list[dict]:
    from hydra import compose, initialize_config_module

    from grpo_lab.train import build_config
    from grpo_lab.trainer import Trainer

    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        config = build_config(compose(config_name="config", overrides=TINY + overrides + [f"trainer.total_steps={steps}"]))
    out = tmp_path / out_name
    Trainer(config, output_dir=out).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == steps
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


def test_token_selection_masks_and_rollout_correction_together(task_dir):
    rows = train(task_dir, ["algo.top_entropy_quantile=0.2", "algo.off_policy_mask_threshold=0.5",
                            "algo.mask_truncated_completions=true", "algo.tis_cap=2.0", "trainer.epochs_per_batch=2"])
    for r in rows:
        assert r["truncated_rows_masked"] > 0  # an untrained model's answers run to the 8-token budget
        if "loss" in r:
            assert math.isfinite(r["loss"]) and "entropy_threshold" in r and "off_policy_masked_frac" in r


CONTROLLED = ["algo.kl_reward_coef=0.05", "algo.kl_reward_controller=adaptive", "algo.kl_target=1e-6",
              "algo.kl_reward_estimator=k3",
              "algo.kl_horizon=20", "algo.entropy_target=50.0", "algo.kl_coef=0.01", "algo.kl_bias_correction=true",
              "trainer.checkpoint_every=1"]


def test_kl_in_reward_and_adaptive_entropy_move_their_coefficients_and_resume_where_they_stopped(task_dir):
    """Before the first update the KL is 0, below the target: beta shrinks by (1 - 0.2 *
    rows / horizon); after it the KL is above its tiny target: beta grows by (1 + 0.2 *
    rows / horizon); the entropy stays below its target, so its
    coefficient climbs by 0.005 a step from 0. A run stopped after 2 steps and resumed
    logs the third step's coefficients exactly as the uninterrupted run does."""
    whole = train(task_dir, CONTROLLED, steps=3, out_name="whole")
    assert [r["kl_reward_coef"] for r in whole][0] == 0.05
    # step 0: KL 0 (no update yet), error clipped to -0.2; step 1: the KL is above the tiny target, +0.2
    assert whole[1]["kl_reward_coef"] == pytest.approx(0.05 * (1 - 0.2 * whole[0]["num_rows"] / 20))
    assert whole[2]["kl_reward_coef"] == pytest.approx(whole[1]["kl_reward_coef"] * (1 + 0.2 * whole[1]["num_rows"] / 20))
    assert [r["entropy_coef"] for r in whole] == pytest.approx([0.0, 0.005, 0.010])
    train(task_dir, CONTROLLED, steps=2, out_name="part")
    resumed = train(task_dir, CONTROLLED + ["trainer.resume=true"], steps=3, out_name="part")
    for key in ("kl_reward_coef", "entropy_coef", "kl_reward", "reward_mean"):
        assert resumed[2][key] == pytest.approx(whole[2][key], rel=1e-9), key


def test_remax_trains_the_sampled_answers_against_the_greedy_one(task_dir):
    rows = train(task_dir, ["algo=remax", "rollout.sampler=remax"])
    for r in rows:  # 4 tasks x 4 sampled answers train; the 4 greedy answers only score
        assert r["num_rows"] == 16 and "remax_baseline_return" in r and r["remax_groups_without_baseline"] == 0
        assert r["responses_per_prompt"] == 4 and r["remax_greedy_episodes"] == 4
    assert any(math.isfinite(r.get("loss", math.nan)) for r in rows)
