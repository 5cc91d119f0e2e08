"""Entry point: ``python -m grpo_lab.train [hydra overrides]``.

Examples::

    python -m grpo_lab.train
    python -m grpo_lab.train algo.group_size=4 env.max_steps=8 trainer.total_steps=20
    python -m grpo_lab.train model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct trainer.warmup.steps=0
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .config import Config, ConfigError

ConfigStore.instance().store(name="grpo_lab_schema", node=Config)


def build_config(cfg: DictConfig) -> Config:
    """The typed, validated config behind a Hydra ``DictConfig``."""
    try:
        config = OmegaConf.to_object(cfg)
    except ValueError as err:  # a section's own checks (__post_init__) refused a value
        raise ConfigError(str(err)) from None
    assert isinstance(config, Config)
    return config.validate()


@hydra.main(version_base="1.3", config_path="pkg://grpo_lab.configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .training.trainer import Trainer

    try:
        config = build_config(cfg)
        trainer = Trainer(config, output_dir=config.trainer.output_dir or HydraConfig.get().runtime.output_dir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger("grpo_lab").info("output directory: %s", trainer.output_dir)
    summary = trainer.train()
    before = summary.get("eval_after_warmup", {}).get("success_rate")
    after = summary.get("eval_final", {}).get("success_rate")
    if before is not None and after is not None:
        print(f"success rate: {before:.3f} after warm-up -> {after:.3f} after RL  ({trainer.output_dir})")


if __name__ == "__main__":
    main()
