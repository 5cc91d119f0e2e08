"""ReMax: the estimator by hand (each sampled episode's return minus its task's greedy
return), the sampler's greedy episodes (one per task, argmax tokens, ids that never
collide), and a training run in which the greedy episodes score but never train."""

from __future__ import annotations

import pytest
import torch

from grpo_lab.advantages import AdvantageInputs, get_estimator
from grpo_lab.config import ConfigError

remax = get_estimator("remax")


def test_remax_by_hand_single_and_multi_turn():
    """Group 0: sampled returns 1, 0 and greedy 0.5 -> +0.5, -0.5, greedy 0. Group 1: a
    two-turn sampled episode (0.2 + 0.8 = 1.0) and a one-turn one (0.0) against a greedy
    two-turn episode of return 0.3 -> +0.7 on both rows of the first, -0.3."""
    inputs = AdvantageInputs(
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.2, 0.8, 0.0, 0.1, 0.2]),
        group_id=torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]),
        traj_id=torch.tensor([0, 1, 2, 3, 3, 4, 5, 5]),
        step=torch.tensor([0, 0, 0, 0, 1, 0, 0, 1]),
        baseline_only=torch.tensor([False, False, True, False, False, False, True, True]))
    out = remax(inputs)
    assert out.advantages.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.7, 0.7, -0.3, 0.0, 0.0])
    assert out.metrics["remax_baseline_return"] == pytest.approx((0.5 + 0.3) / 2)
    assert out.metrics["remax_groups_without_baseline"] == 0


def test_a_group_that_lost_its_greedy_episode_gets_no_signal():
    inputs = AdvantageInputs(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group_id=torch.tensor([0, 0, 1, 1]),
                             traj_id=torch.tensor([0, 1, 2, 3]), baseline_only=torch.tensor([False, False, False, True]))
    out = remax(inputs)
    assert out.advantages.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert out.metrics["remax_groups_without_baseline"] == 1 and out.metrics["frac_zero_std_groups"] == 0.5


def test_remax_and_its_sampler_come_together():
    from grpo_lab.train import compose_config

    with pytest.raises(ConfigError, match="add rollout.sampler=remax"):
        compose_config(["algo=remax"])
    with pytest.raises(ConfigError, match="rollout.sampler='remax'.*greedy"):
        compose_config(["rollout.sampler=remax"])


def test_the_sampler_plays_one_greedy_episode_per_task(tmp_path):
    from grpo_lab.train import compose_config
    from grpo_lab.trainer import Trainer

    config = compose_config(["algo=remax", "rollout.sampler=remax", "algo.group_size=3", "trainer.tasks_per_step=2",
                             "env.max_steps=3", "model.tiny_hidden_size=32", "model.tiny_num_heads=1",
                             "model.tiny_num_kv_heads=1", "model.tiny_num_layers=1", "logger.wandb=false"])
    trainer = Trainer(config, output_dir=tmp_path)
    batch = trainer.collect(0)
    for g in batch.group_id.unique().tolist():
        rows = batch.group_id == g
        greedy = torch.unique(batch.traj_id[rows & batch.baseline_only]).tolist()
        sampled = torch.unique(batch.traj_id[rows & ~batch.baseline_only]).tolist()
        assert greedy == [g * 4 + 3] and len(sampled) == 3 and max(sampled) < g * 4 + 3 and min(sampled) >= g * 4
    model = trainer.model.eval()
    for i in torch.nonzero(batch.baseline_only).flatten().tolist():  # greedy: each token the argmax
        ids = torch.cat([batch.prompt_ids[i], batch.response_ids[i]])
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0]  # [P + R, V]
        p = batch.prompt_ids[i].numel()
        assert torch.equal(logits[p - 1: -1].argmax(-1), batch.response_ids[i])
