"""Deciding how a run starts in its output directory: afresh, or resumed from a checkpoint
under the same config.

- ``trainer.resume=false`` refuses a directory that holds a run (metrics or a checkpoint),
  so that nothing is overwritten; ``true`` needs a complete checkpoint; ``auto`` resumes
  when there is one and otherwise starts afresh, keeping the metrics of a run that died
  before its first checkpoint under a new name.
- A resumed run's config must equal the saved one, except the harmless keys
  (:attr:`~grpo_lab.config.TrainerConfig.HARMLESS_ON_RESUME`, ``logger.*``), unless
  ``trainer.resume_allow_changes=true``. Every other changed key is listed.
- ``metrics.jsonl`` is read back up to the checkpoint's step; a torn last line (a crash
  while writing it) is dropped with a warning, any other unreadable line names the file
  and line.
- Directories a crash left half-written (``.tmp_step_*``, ``.old_step_*``,
  ``.tmp_reference``) are removed.
- A resume starts from the newest checkpoint that verifies
  (:func:`~grpo_lab.training.checkpoint.verify_checkpoint`); a newer one that does not is
  moved aside as ``broken_step_N`` with a warning naming its damaged file, and when none
  verifies the run stops saying so.

Every refusal is a :class:`RunDirectoryError` (a :class:`~grpo_lab.config.ConfigError`)
that names the fix.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError
from .checkpoint import CheckpointError, checkpoint_dir, latest_checkpoint, newest_loadable

log = logging.getLogger("grpo_lab")


class RunDirectoryError(ConfigError):
    """``trainer.output_dir`` cannot start the run as ``trainer.resume`` asks: it would
    overwrite a run, or it holds nothing (loadable) to continue."""

PARTIAL_PATTERNS = (".tmp_step_*", ".old_step_*", ".tmp_reference")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dict values that are empty stay as ``{}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(saved: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
                   ) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` of every key that differs, sorted by key (a key
    present on one side only shows ``<absent>`` on the other). A key the saved config
    lacks (a setting added since it was written) counts as unchanged when the new value
    is its default in ``defaults``."""
    a, b, d = flatten(saved), flatten(new), flatten(defaults or {})
    absent = "<absent>"
    changes = []
    for k in sorted(set(a) | set(b)):
        old, value = a.get(k, absent), b.get(k, absent)
        if old == absent and k in d and d[k] == value:
            continue
        if old != value:
            changes.append((k, old, value))
    return changes


def is_harmless(key: str, harmless: Iterable[str]) -> bool:
    return key.startswith("logger.") or key in set(harmless)


def check_resume_config(saved: dict[str, Any] | None, new: dict[str, Any], harmless: Iterable[str],
                        allow_changes: bool, defaults: dict[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """The changes a resume accepts; raises :class:`ConfigError` listing the refused ones."""
    if saved is None:
        log.warning("the checkpoint holds no config (written by an older grpo_lab): the resumed run's config is not checked")
        return []
    changes = config_changes(saved, new, defaults)
    refused = [c for c in changes if not is_harmless(c[0], harmless)]
    if refused and not allow_changes:
        lines = "\n".join(f"  {k}: {old!r} -> {value!r}" for k, old, value in refused)
        raise ConfigError(
            f"trainer.resume: the config differs from the run being resumed in {len(refused)} key(s):\n{lines}\n"
            "Resume with the run's own values, or add trainer.resume_allow_changes=true to continue with the new ones "
            "(the steps already taken keep the old ones).")
    for key, old, value in changes:
        log.info("resume: %s changed %r -> %r", key, old, value)
    return changes


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line is dropped (with a warning),
    another unreadable line raises ``ValueError`` naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == last and not path.read_bytes().endswith(b"\n"):
                log.warning("%s: dropping its last line, written only in part when the run stopped (%d characters)",
                            path, len(line))
                break
            raise ValueError(f"{path}, line {i + 1}: cannot be read ({err}); the file is damaged: repair or remove "
                             "that line to resume") from None
        records.append(record)
    return records


def remove_partial_writes(output_dir: Path) -> list[Path]:
    """Remove the checkpoint directories a crash left half-written; returns them. A
    complete checkpoint set aside while the same step was saved again (``.old_step_N_*``
    without ``step_N``: the crash came between the two renames) is put back instead."""
    root = checkpoint_dir(output_dir)
    for old in sorted(root.glob(".old_step_*")) if root.is_dir() else []:
        final = root / ("step_" + old.name[len(".old_step_"):].split("_")[0])
        if not final.exists() and (old / "trainer_state.pt").is_file():
            old.rename(final)
            log.info("restored %s, set aside when an earlier run stopped", final)
    found = [p for pattern in PARTIAL_PATTERNS for p in root.glob(pattern)] if root.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left half-written when an earlier run stopped", path)
    return found


def holds_a_run(output_dir: Path) -> bool:
    metrics = output_dir / "metrics.jsonl"
    return (metrics.exists() and metrics.stat().st_size > 0) or latest_checkpoint(output_dir) is not None


def finished_run(output_dir: Path) -> bool:
    """``output_dir`` holds a run that ended normally (its summary has no ``stopped``)."""
    path = output_dir / "summary.json"
    if not path.exists():
        return False
    try:
        return "stopped" not in json.loads(path.read_text())
    except ValueError:
        return False


def check_start(output_dir: Path, mode: str) -> None:
    """Raise :class:`RunDirectoryError` when ``trainer.resume=mode`` cannot start in
    ``output_dir`` as it is; reads only (a check before anything writes there)."""
    point = latest_checkpoint(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if point is None and finished_run(output_dir) and holds_a_run(output_dir):
        raise RunDirectoryError(
            f"{output_dir} holds a finished run ({metrics.name}, summary.json) without a checkpoint to continue from: "
            "choose a new trainer.output_dir so that its metrics and model are not overwritten")
    if mode == "true" and point is None:
        died = " (its run stopped before its first checkpoint)" if holds_a_run(output_dir) else ""
        raise RunDirectoryError(
            f"trainer.resume=true but {checkpoint_dir(output_dir)} holds no complete checkpoint{died}: set "
            "trainer.output_dir to the directory of the run to continue (it needs trainer.checkpoint_every > 0), or "
            "use trainer.resume=auto to start this directory afresh")
    if mode == "false" and holds_a_run(output_dir):
        if point is not None:
            raise RunDirectoryError(
                f"{output_dir} holds a run with a checkpoint at step {point[0]} ({metrics.name}): set "
                "trainer.resume=true (or auto) to continue it, or choose a new trainer.output_dir so that its metrics "
                "and model are not overwritten")
        raise RunDirectoryError(
            f"{metrics} already exists from a run that stopped before its first checkpoint: there is nothing to resume; "
            "set trainer.resume=auto to start it afresh (its metrics are kept aside), or choose a new trainer.output_dir")


def set_aside(error: CheckpointError) -> Path:
    """Rename the damaged checkpoint of ``error`` to ``broken_step_N`` (never loaded,
    never pruned); returns the new path."""
    path = error.path
    target = path.with_name("broken_" + path.name)
    k = 1
    while target.exists():
        target = path.with_name(f"broken_{path.name}_{k}")
        k += 1
    path.rename(target)
    return target


def choose_start(output_dir: Path, mode: str) -> tuple[int, Path] | None:
    """The checkpoint to resume from (``None``: start afresh), by ``trainer.resume``
    (``false``, ``true`` or ``auto``); refuses what would overwrite or lose a run
    (:func:`check_start`). Newer checkpoints that do not verify are set aside; when none
    verifies, a resume stops naming each one's damaged file."""
    remove_partial_writes(output_dir)
    check_start(output_dir, mode)
    point = None
    if mode != "false":
        point, broken = newest_loadable(output_dir)
        if broken and point is None:
            lines = "\n".join(f"  {err}" for err in broken)
            raise RunDirectoryError(
                f"trainer.resume={mode}: no checkpoint in {checkpoint_dir(output_dir)} can be loaded:\n{lines}\n"
                "Restore the damaged files from a copy, or start a new run in another trainer.output_dir")
        for err in broken:
            moved = set_aside(err)
            log.warning("checkpoint %s cannot be loaded (%s: %s): moved aside to %s; resuming from %s", err.path.name,
                        err.file, err.reason, moved.name, point[1].name)
    metrics = output_dir / "metrics.jsonl"
    if point is None and metrics.exists():
        if metrics.stat().st_size > 0:
            kept = metrics.with_name(f"metrics.before_{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            metrics.rename(kept)
            log.warning("%s held a run that stopped before its first checkpoint: starting afresh, its metrics kept as %s",
                        output_dir, kept.name)
        else:
            metrics.unlink()
    return point


def metrics_until(output_dir: Path, step: int) -> list[dict[str, Any]]:
    """The metrics of steps up to ``step``, rewritten in place (later ones are redone)."""
    path = output_dir / "metrics.jsonl"
    history = [r for r in read_metrics(path) if r.get("step", -1) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in history))
    tmp.replace(path)
    return history
