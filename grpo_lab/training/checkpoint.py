"""Checkpoints that a crash cannot half-write, and resuming from the newest one.

A checkpoint is a directory ``checkpoints/step_NNNNNN/`` in the run's output directory:

- ``model/``: ``save_pretrained`` of the policy (a LoRA run saves its adapter), loadable
  by transformers, PEFT or vLLM as it is;
- ``trainer_state.pt``: the optimizer, the learning-rate schedule, the step, the random
  generators and the sampler's state (length predictor, reuse buffer) of every rank, so
  a resumed run continues the same run;
- ``sharded/`` (FSDP runs): the sharded model and optimizer, written and read by every
  rank through ``torch.distributed.checkpoint``;
- ``manifest.json``: every other file's size, and the SHA-256 of those up to
  :data:`HASHED_UP_TO` bytes (configs, tokenizer, small states), written last.

Under data parallelism the output directory must be one shared file system for all
ranks; rank 0 writes everything but the shards.

It is written under a temporary name and renamed into place when complete; a directory
with a temporary name is never read and never counts. Older checkpoints are deleted
only after a newer one is complete (``keep`` newest are kept). A write that fails (a
full disk) removes what it wrote and raises :class:`CheckpointWriteError`; the checkpoints
before it stay whole.

A checkpoint is verified before it is loaded (:func:`verify_checkpoint`): every file the
manifest lists is there with its size (and hash), every ``.safetensors`` header reads, and
the trainer state unpickles. A damaged file is named; :func:`newest_loadable` then falls
back to the newest checkpoint that verifies. Departure stated: weights larger than
:data:`HASHED_UP_TO` are checked by size and header only (hashing every optimizer state
would cost a minute per checkpoint at 8B parameters), so bytes changed in place inside
them are not caught; truncated, missing and unreadable files are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError

from .distributed import SINGLE, DistContext, barrier, broadcast_object, gather_objects

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
#: files up to this size get a SHA-256 in the manifest; larger ones their size only
HASHED_UP_TO = 64 * 2**20

log = logging.getLogger("grpo_lab")


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded: ``file`` (relative to ``path``) is missing,
    truncated or unreadable, as ``reason`` says."""

    def __init__(self, path: str | os.PathLike, file: str, reason: str) -> None:
        self.path, self.file, self.reason = Path(path), file, reason
        super().__init__(f"{self.path / file}: {reason}")


#: what a failed write raises: the OS's errors, and safetensors' own (a full disk while
#: it serializes: "I/O error: No space left on device (os error 28)")
WRITE_ERRORS = (OSError, SafetensorError)


def as_os_error(err: Exception) -> OSError:
    """``err`` as an ``OSError`` (safetensors' errors carry the errno in their text)."""
    if isinstance(err, OSError):
        return err
    found = re.search(r"\(os error (\d+)\)", str(err))
    errno = int(found.group(1)) if found else None
    return OSError(errno, os.strerror(errno) if errno else str(err))


class CheckpointWriteError(OSError):
    """Writing the checkpoint of ``step`` (or ``what``) failed (``cause``: the
    ``OSError``, e.g. a full disk); nothing of it was left behind."""

    def __init__(self, step: int, cause: OSError, what: str | None = None) -> None:
        self.step, self.cause = step, cause
        text = f"{what or f'the checkpoint of step {step}'} could not be written ({cause})"
        super().__init__(cause.errno, text + ("; what was written of it is removed" if what is None else ""))

    def __str__(self) -> str:
        return self.strerror


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.pt").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[int, Path] | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_on_main(dist: DistContext, write: Callable[[], Any], what: str, step: int) -> None:
    """Run ``write`` on rank 0; when it fails (:data:`WRITE_ERRORS`, a full disk), every
    rank raises :class:`CheckpointWriteError` naming ``what``."""
    failure = None
    if dist.is_main:
        try:
            write()
        except WRITE_ERRORS as err:
            err = as_os_error(err)
            failure = (err.errno, err.strerror or str(err), err.filename)
    failure = broadcast_object(dist, failure)
    if failure is not None:
        raise CheckpointWriteError(step, OSError(*failure), what=what)


def write_manifest(directory: Path) -> None:
    """``directory/manifest.json``: the size of every file under ``directory``, and the
    SHA-256 of those up to :data:`HASHED_UP_TO` bytes."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        entry: dict[str, Any] = {"bytes": size}
        if size <= HASHED_UP_TO:
            entry["sha256"] = _sha256(path)
        files[path.relative_to(directory).as_posix()] = entry
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(directory / MANIFEST)


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``directory`` (a checkpoint,
    or the saved KL reference) that is missing, of another size or hash than its manifest
    says, or unreadable (a ``.safetensors`` header, the trainer state). A checkpoint
    without a manifest (written by an older grpo_lab) gets the readability checks."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(directory, MANIFEST, f"unreadable ({err})") from None
        for name, entry in files.items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(directory, name, "missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise CheckpointError(directory, name, f"{size} bytes where {entry['bytes']} were written (truncated or "
                                                       "overwritten)")
            if "sha256" in entry and _sha256(path) != entry["sha256"]:
                raise CheckpointError(directory, name, "its contents changed since it was written (SHA-256 differs)")
    for path in sorted(directory.rglob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(directory, path.relative_to(directory).as_posix(),
                                  f"unreadable ({type(err).__name__}: {err})") from None
    state = directory / "trainer_state.pt"
    if state.is_file():
        try:
            torch.load(state, weights_only=False, mmap=True)
        except Exception as err:  # a truncated zip gives OSError, RuntimeError or EOFError
            raise CheckpointError(directory, state.name, f"unreadable ({type(err).__name__}: {err})") from None


def newest_loadable(output_dir: str | os.PathLike) -> tuple[tuple[int, Path] | None, list[CheckpointError]]:
    """The newest complete checkpoint that verifies (:func:`verify_checkpoint`), and the
    errors of the newer ones that did not, newest first."""
    broken: list[CheckpointError] = []
    for step, path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            broken.append(err)
            continue
        return (step, path), broken
    return None, broken


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep: int, *, dist: DistContext = SINGLE, weights: dict[str, torch.Tensor] | None = None,
                    write_shards: Callable[[Path], None] | None = None, tokenizer=None) -> Path:
    """Write the checkpoint of ``step`` atomically, then prune to the ``keep`` newest.

    Every rank calls it. ``weights``: the model's whole state dict when the model itself
    holds only shards (FSDP; rank 0's); ``write_shards(dir)``: what every rank writes into
    the checkpoint (``torch.distributed.checkpoint``), before rank 0 completes it;
    ``tokenizer``: saved beside the model, so that ``model/`` loads as a model directory
    (``AutoTokenizer``, vLLM). Raises :class:`CheckpointWriteError` (on every rank) when
    the write fails, after removing what it wrote."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:06d}"
    tmp = None
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    tmp = Path(broadcast_object(dist, str(tmp)))
    failure: OSError | None = None
    try:
        if write_shards is not None:
            write_shards(tmp / "sharded")
    except OSError as err:
        failure = err
    barrier(dist)
    if dist.is_main and failure is None:
        try:
            _write(tmp, step, model, state, weights, tokenizer)
        except WRITE_ERRORS as err:
            failure = as_os_error(err)
    reports = gather_objects(dist, None if failure is None else (failure.errno, failure.strerror or str(failure),
                                                                  failure.filename))
    failed = next((r for r in reports if r is not None), None)  # the first failing rank's, on every rank
    if failed is not None:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(dist)
        raise CheckpointWriteError(step, failure if failure is not None else OSError(*failed))
    if dist.is_main:
        _complete(root, final, tmp, keep)
    barrier(dist)
    return final


def _write(tmp: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
           weights: dict[str, torch.Tensor] | None, tokenizer) -> None:
    """Rank 0: the model (with its tokenizer), the trainer state and the manifest into ``tmp``."""
    model.save_pretrained(tmp / "model", state_dict=weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    torch.save({**state, "step": step}, tmp / "trainer_state.pt")
    write_manifest(tmp)


def _complete(root: Path, final: Path, tmp: Path, keep: int) -> None:
    """Rank 0: the written ``tmp`` renamed into place; prune."""
    if final.exists():  # the same step saved again: replace it only once the new one is whole
        old = root / f".old_{final.name}_{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    for _, path in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(path)


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shards of the model and optimizer (``torch.distributed.checkpoint``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Read back :func:`sharded_state` from checkpoint ``path`` into the sharded model and
    optimizer (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(path) / "sharded"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing: the checkpoint was not written by an FSDP run")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(path) / "trainer_state.pt", weights_only=False)


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load ``path/model`` (written by :func:`save_checkpoint`) into ``model`` in place.

    A PEFT model gets its adapter; a plain model its weights, where the only keys allowed
    to be absent from the file are tied aliases (``save_pretrained`` stores a tied output
    layer once)."""
    from safetensors.torch import load_file

    model_dir = Path(path) / "model"
    try:
        from peft import PeftModel, set_peft_model_state_dict
    except ImportError:
        PeftModel = None
    if PeftModel is not None and isinstance(model, PeftModel):
        result = set_peft_model_state_dict(model, load_file(model_dir / "adapter_model.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise KeyError(f"{model_dir}: adapter tensors the model does not have: {result.unexpected_keys[:5]}")
        return
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise KeyError(f"{model_dir}: weights the model does not have: {unexpected[:5]}")
    loaded = {p.data_ptr() for name, p in model.state_dict().items() if name in weights}
    untied = [name for name in missing if model.state_dict()[name].data_ptr() not in loaded]
    if untied:
        raise KeyError(f"{model_dir}: weights missing from the checkpoint: {untied[:5]}")
