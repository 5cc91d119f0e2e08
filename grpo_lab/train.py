"""Entry point: ``python -m grpo_lab.train [hydra overrides]``.

Examples::

    python -m grpo_lab.train
    python -m grpo_lab.train algo.group_size=4 env.max_steps=8 trainer.total_steps=20
    python -m grpo_lab.train model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct trainer.warmup.steps=0
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
import typing
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .config import Config, ConfigError
from .training.stop import RunStopped

ConfigStore.instance().store(name="grpo_lab_schema", node=Config)


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``node`` (a ``DictConfig``) that are not fields of the dataclass
    ``schema``, recursively (dict-typed fields such as ``env.kwargs`` take any key).
    Hydra lets ``+key=value`` add a key to a typed config; nothing would read it."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    out = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            out.append(name)
            continue
        child = hints.get(key)
        if dataclasses.is_dataclass(child) and OmegaConf.is_dict(node[key]):
            out.extend(unknown_keys(node[key], child, name + "."))
    return out


def build_config(cfg: DictConfig) -> Config:
    """The typed, validated config behind a Hydra ``DictConfig``."""
    unknown = unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}: no such setting (a '+' adds a key that nothing reads); "
                          "see `python -m grpo_lab.train --cfg job` for every key")
    try:
        config = OmegaConf.to_object(cfg)
    except ValueError as err:  # a section's own checks (__post_init__) refused a value
        raise ConfigError(str(err)) from None
    assert isinstance(config, Config)
    return config.validate()


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The validated config of ``python -m grpo_lab.train OVERRIDES``, without running it
    (Hydra's compose API over the shipped configs)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        return build_config(compose(config_name="config", overrides=list(overrides)))


@hydra.main(version_base="1.3", config_path="pkg://grpo_lab.configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from .training import distributed

    distributed.narrow_visible_devices()  # before anything initialises CUDA
    from .training.trainer import Trainer

    try:
        code = _run(cfg, Trainer)
    except BaseException:
        distributed.shutdown()
        raise
    distributed.shutdown(wait=True)  # the run ended on every rank: leave together
    if code:
        sys.exit(code)


def _run(cfg: DictConfig, Trainer) -> int:
    from hydra.core.hydra_config import HydraConfig

    try:
        config = build_config(cfg)
        trainer = Trainer(config, output_dir=config.trainer.output_dir or HydraConfig.get().runtime.output_dir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger("grpo_lab").info("output directory: %s", trainer.output_dir)
    try:
        summary = trainer.train()
    except RunStopped as stopped:
        print(f"run stopped: {stopped}", file=sys.stderr)
        if stopped.last_step >= 0:
            print("resume with:\n  " + resume_command(trainer.output_dir), file=sys.stderr)
        return stopped.exit_code  # every rank stops at the same step
    except ConfigError as err:  # found when the run starts (resume checks)
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    before = summary.get("eval_after_warmup", {}).get("success_rate")
    after = summary.get("eval_final", {}).get("success_rate")
    if before is not None and after is not None and trainer.dist.is_main:
        print(f"success rate: {before:.3f} after warm-up -> {after:.3f} after RL  ({trainer.output_dir})")
    return 0


def resume_command(output_dir) -> str:
    """This run's command line, continuing in ``output_dir`` (``trainer.resume=true``)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("trainer.output_dir=", "trainer.resume="))]
    args = keep + [f"trainer.output_dir={output_dir}", "trainer.resume=true"]
    return " ".join(["python -m grpo_lab.train", *(shlex.quote(a) for a in args)])


if __name__ == "__main__":
    main()
