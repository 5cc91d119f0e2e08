"""Checkpoints: written whole or not at all, pruned only after a newer one is complete,
and a resumed run continues exactly the run that was interrupted."""

from __future__ import annotations

import json

import pytest
import torch

from grpo_lab.config import AlgoConfig, Config, EnvConfig, LoggerConfig, ModelConfig, TrainerConfig, WarmupConfig
from grpo_lab.training.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights, save_checkpoint
from grpo_lab.training.trainer import Trainer


def test_a_half_written_checkpoint_is_never_the_latest(tiny_model, tmp_path):
    save_checkpoint(tmp_path, 3, tiny_model, {"x": 1}, keep=2)
    (tmp_path / "checkpoints" / ".tmp_step_000005_1").mkdir()  # a crash mid-write
    (tmp_path / "checkpoints" / "step_000007").mkdir()  # no trainer state: incomplete
    step, path = latest_checkpoint(tmp_path)
    assert step == 3 and path.name == "step_000003"


def test_pruning_keeps_the_newest_and_weights_round_trip(tiny_model, tokenizer, tmp_path):
    from grpo_lab.modeling import build_tiny_model

    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tiny_model, {}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    other = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128, seed=1)
    load_model_weights(other, latest_checkpoint(tmp_path)[1])
    for (name, a), b in zip(tiny_model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_loading_refuses_a_checkpoint_of_another_shape(tiny_model, tokenizer, tmp_path):
    from grpo_lab.modeling import build_tiny_model

    save_checkpoint(tmp_path, 0, tiny_model, {}, keep=1)
    bigger = build_tiny_model(tokenizer, hidden_size=64, num_layers=3, num_heads=1, num_kv_heads=1, intermediate_size=128)
    with pytest.raises(KeyError, match="missing"):
        load_model_weights(bigger, latest_checkpoint(tmp_path)[1])


def config(total_steps, **trainer):
    return Config(
        algo=AlgoConfig(group_size=4, kl_coef=0.01),  # the KL reference must survive the resume too
        env=EnvConfig(max_steps=4),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128),
        trainer=TrainerConfig(total_steps=total_steps, tasks_per_step=4, eval_episodes=4, lr=1e-3, checkpoint_every=2,
                              warmup=WarmupConfig(steps=20, batch_size=16, episodes=40), **trainer),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )


@pytest.mark.slow
def test_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    """Property: 4 steps in one go, and 2 steps then a resume to 4, end with the same
    weights and the same per-step metrics."""
    whole = Trainer(config(4), output_dir=tmp_path / "whole")
    whole.train()
    first = Trainer(config(2), output_dir=tmp_path / "split")
    first.train()
    with pytest.raises(FileExistsError, match="trainer.resume=true"):
        Trainer(config(4), output_dir=tmp_path / "split").train()
    resumed = Trainer(config(4, resume=True), output_dir=tmp_path / "split")
    resumed.train()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read("whole"), read("split")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["reward_mean"] == rb["reward_mean"] and ra["num_rows"] == rb["num_rows"]
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [1, 3]


def test_resume_without_a_checkpoint_names_the_fix(tmp_path):
    trainer = Trainer(config(2, resume=True), output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="trainer.output_dir"):
        trainer.train()
