"""Entry point: ``python -m grpo_lab.train [hydra overrides]``.

Examples::

    python -m grpo_lab.train
    python -m grpo_lab.train algo.group_size=4 env.max_steps=8 trainer.total_steps=20
    python -m grpo_lab.train model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct trainer.warmup.steps=0
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .config import Config, ConfigError, aliased
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
    except MissingMandatoryValue as err:  # a ??? in a shipped config that the command line did not fill
        raise ConfigError(f"{err.full_key} must be set: add {err.full_key}=... to the command line") from None
    except ValueError as err:  # a section's own checks (__post_init__) refused a value
        raise ConfigError(str(err)) from None
    assert isinstance(config, Config)
    return config.validate()


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The validated config of ``python -m grpo_lab.train OVERRIDES``, without running it
    (Hydra's compose API over the shipped configs)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        return build_config(compose(config_name="config", overrides=aliased(overrides)))


def main(argv: list[str] | None = None) -> None:
    """``python -m grpo_lab.train [overrides]``: the run's config is composed and
    checked first (:func:`preflight`), so that a user mistake (an override Hydra cannot
    apply, a bad value, a finished output directory) is one ``error: ...`` line and exit
    code 2 before anything is written; then Hydra runs it (:func:`hydra_main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = preflight(argv)
    except ConfigError as err:
        fail(err)
    sys.argv = [sys.argv[0], *argv]
    hydra_main()


def fail(err: BaseException) -> typing.NoReturn:
    """A user mistake: ``error: ...`` (one line per line of its message) on stderr, the
    traceback in the run's log file (when one is open), exit code 2."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logging.LogRecord("grpo_lab", logging.ERROR, __file__, 0, "stopped: %s", (err,),
                                             (type(err), err, err.__traceback__)))
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def preflight(argv: list[str]) -> list[str]:
    """The command line to hand to Hydra, once its config composes and validates; raises
    :class:`ConfigError` for Hydra's own override errors, bad values, and an output
    directory the run cannot start in. With ``trainer.output_dir`` set, Hydra's run
    directory (``.hydra/``, ``train.log``) is that directory too. Command lines with
    Hydra flags (``--cfg``, ``--multirun``, ...) go to Hydra as they are."""
    argv = aliased(argv)
    if any(a.startswith("-") for a in argv):
        return argv
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
    except (HydraException, OmegaConfBaseException) as err:
        cause = str(err.__cause__ or "").split("\n")[0]  # e.g. the value that could not be converted
        text = str(err) if not cause or cause in str(err) else f"{err}: {cause}"
        text = text.split("Config search path:")[0]  # Hydra's note on where it looked
        raise ConfigError(" ".join(text.split())) from None
    config = build_config(cfg)
    output_dir = config.trainer.output_dir
    if output_dir and not any(a.lstrip("+~").startswith("hydra.run.dir=") for a in argv):
        from .training.resume import check_start

        path = Path(output_dir).expanduser()
        if path.is_dir():
            check_start(path, config.trainer.resume_mode())
        argv = [*argv, f"hydra.run.dir={override_value(str(path))}"]
    return argv


def override_value(text: str) -> str:
    """``text`` as a Hydra override value: as it is when plain, else single-quoted."""
    if re.fullmatch(r"[\w./~+@%-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@hydra.main(version_base="1.3", config_path="pkg://grpo_lab.configs", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from .training import distributed

    distributed.narrow_visible_devices()  # before anything initialises CUDA
    from .trainer import Trainer

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
        fail(err)
    logging.getLogger("grpo_lab").info("output directory: %s", trainer.output_dir)
    try:
        summary = trainer.train()
    except RunStopped as stopped:
        print(f"run stopped: {stopped}", file=sys.stderr)
        if stopped.last_step >= 0:
            print("resume with:\n  " + resume_command(trainer.output_dir), file=sys.stderr)
        return stopped.exit_code  # every rank stops at the same step
    except ConfigError as err:  # found when the run starts (the output directory, resume checks)
        fail(err)
    before, after = summary.get("eval_after_warmup", {}), summary.get("eval_final", {})
    if before.get("success_rate") is not None and after.get("success_rate") is not None and trainer.dist.is_main:
        print(f"success rate: {before['success_rate']:.3f} after warm-up -> {after['success_rate']:.3f} after RL "
              f"({after.get('episodes', '?')} eval episodes; {trainer.output_dir})")
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
