"""Checkpoints that a crash cannot half-write, and resuming from the newest one.

A checkpoint is a directory ``checkpoints/step_NNNNNN/`` in the run's output directory:

- ``model/``: ``save_pretrained`` of the policy (a LoRA run saves its adapter), loadable
  by transformers, PEFT or vLLM as it is;
- ``trainer_state.pt``: the optimizer, the learning-rate schedule, the step, the random
  generators and the sampler's state (length predictor, reuse buffer) of every rank, so
  a resumed run continues the same run;
- ``sharded/`` (FSDP runs): the sharded model and optimizer, written and read by every
  rank through ``torch.distributed.checkpoint``.

Under data parallelism the output directory must be one shared file system for all
ranks; rank 0 writes everything but the shards.

It is written under a temporary name and renamed into place when complete; a directory
with a temporary name is never read and never counts. Older checkpoints are deleted
only after a newer one is complete (``keep`` newest are kept).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .distributed import SINGLE, DistContext, barrier, broadcast_object

STEP_DIR = re.compile(r"^step_(\d{6,})$")


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


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep: int, *, dist: DistContext = SINGLE, weights: dict[str, torch.Tensor] | None = None,
                    write_shards: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically, then prune to the ``keep`` newest.

    Every rank calls it. ``weights``: the model's whole state dict when the model itself
    holds only shards (FSDP; rank 0's); ``write_shards(dir)``: what every rank writes into
    the checkpoint (``torch.distributed.checkpoint``), before rank 0 completes it."""
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
    if write_shards is not None:
        write_shards(tmp / "sharded")
    barrier(dist)
    if dist.is_main:
        _complete(root, final, tmp, step, model, state, keep, weights)
    barrier(dist)
    return final


def _complete(root: Path, final: Path, tmp: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int,
              weights: dict[str, torch.Tensor] | None) -> None:
    """Rank 0: the model and the trainer state into ``tmp``, renamed into place; prune."""
    model.save_pretrained(tmp / "model", state_dict=weights)
    torch.save({**state, "step": step}, tmp / "trainer_state.pt")
    if final.exists():  # the same step saved again: replace it only once the new one is whole
        old = root / f".old_step_{step:06d}_{os.getpid()}"
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
