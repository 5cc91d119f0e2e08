"""A training run as a user starts it (the Hydra config and ``Trainer``), for the tests
that train end to end."""

from __future__ import annotations

import json
from pathlib import Path

#: a small model and short warm-up for end-to-end runs of a few steps
SMALL_RUN = ["trainer.eval_episodes=2", "trainer.warmup.steps=10", "trainer.warmup.episodes=40",
             "model.tiny_hidden_size=64", "model.tiny_num_heads=1", "model.tiny_num_kv_heads=1",
             "logger.wandb=false", "logger.progress_bar=false", "logger.plot=false", "trainer.save_final=false"]


def train_rows(out: Path, overrides: list[str]) -> list[dict]:
    """Train with ``overrides`` (composed as ``python -m grpo_lab.train`` does) into
    ``out``; the records of its ``metrics.jsonl``."""
    from hydra import compose, initialize_config_module

    from grpo_lab.train import build_config
    from grpo_lab.trainer import Trainer

    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        config = build_config(compose(config_name="config", overrides=overrides))
    Trainer(config, output_dir=out).train()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
