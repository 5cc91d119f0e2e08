"""A run's checkpoints: what one holds (the whole model, loadable by transformers; the
optimizer and schedule; every rank's random generators and sampler state; the config;
what the summary carries), writing it, and restoring a run from it; the KL reference
saved once for resumed runs; the final model; the checkpoint a run starts from, the same
on every rank; and the advice a stopped run ends with.
The files and their integrity checks are :mod:`grpo_lab.training.checkpoint`'s."""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .build import RunParts
from .config import Config, ConfigError, TrainerConfig
from .modeling import frozen, torch_dtype
from .training import distributed as dp
from .training.checkpoint import (WRITE_ERRORS, CheckpointError, CheckpointWriteError, as_os_error, checkpoint_dir,
                                  load_model_weights, load_sharded_state, load_trainer_state, save_checkpoint,
                                  sharded_state, verify_checkpoint, write_manifest, write_on_main)
from .training.resume import RunDirectoryError, check_resume_config, choose_start
from .training.shared_prefix import enable_shared_prefix

#: summary fields a resumed run carries over from the checkpoint it starts from
CARRIED = ("warmup_loss_first", "warmup_loss_last")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An evaluation-mode copy of ``model`` without gradients (the KL reference)."""
    return frozen(copy.deepcopy(model))


def save_reference(output_dir: Path, ref_model: torch.nn.Module) -> None:
    """The KL reference (the policy when RL starts), once, for resumed runs; written
    under a temporary name and renamed when complete."""
    final = checkpoint_dir(output_dir) / "reference"
    tmp = final.with_name(".tmp_reference")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ref_model.save_pretrained(tmp / "model")
        write_manifest(tmp)
    except WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(-1, as_os_error(err), what="the KL reference") from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def checked_resume_state(config: Config, path: Path) -> dict[str, Any]:
    """The saved state of the checkpoint at ``path``, after checking its config against
    ``config`` (the keys :attr:`TrainerConfig.HARMLESS_ON_RESUME` may differ; with a
    learning-rate schedule, not the run's length)."""
    state = load_trainer_state(path)
    harmless = TrainerConfig.HARMLESS_ON_RESUME
    if config.trainer.lr_scheduler != "constant":  # the schedule's length is the run's
        harmless = tuple(k for k in harmless if k != "trainer.total_steps")
    check_resume_config(state.get("config"), asdict(config), harmless, config.trainer.resume_allow_changes,
                        defaults=asdict(Config().validate()))
    return state


def choose_start_on_every_rank(dist: dp.DistContext, output_dir: Path, mode: str) -> tuple[int, Path] | None:
    """:func:`~grpo_lab.training.resume.choose_start` (``None``: start afresh, else the
    step and checkpoint to resume from) decided on rank 0, which moves files, and its
    answer or its refusal given to every rank."""
    if not dist.enabled:
        return choose_start(output_dir, mode)
    answer: Any = None
    if dist.is_main:
        try:
            answer = ("ok", choose_start(output_dir, mode))
        except (FileExistsError, FileNotFoundError, ValueError) as err:
            answer = ("error", err)
    answer = dp.broadcast_object(dist, answer)
    if answer[0] == "error":
        raise answer[1]
    point = answer[1]
    return None if point is None else (point[0], Path(point[1]))


def resume_advice(output_dir: Path, last_step: int, intact: bool = False) -> str:
    """How to continue a run whose last completed (and saved) step is ``last_step``;
    ``intact``: say that its checkpoint survived the failure that stopped the run."""
    if last_step < 0:
        return (f"there is no checkpoint to continue from: run again with trainer.output_dir={output_dir} "
                "trainer.resume=auto to start afresh")
    how = (f"to continue from step {last_step + 1}, run again with trainer.output_dir={output_dir} "
           "trainer.resume=true (and the same other settings)")
    return f"the checkpoint of step {last_step} is intact; {how}" if intact else how


class RunCheckpoints:
    """Saving and restoring the run made of ``parts``; ``eval_after_warmup`` (the
    evaluation the run's figures start from) is saved with every checkpoint."""

    def __init__(self, parts: RunParts) -> None:
        self.parts = parts
        self.eval_after_warmup: dict[str, float] = {}

    @property
    def sharded(self) -> bool:
        return self.parts.dist.strategy == "fsdp"

    def rollout_state(self) -> dict[str, Any]:
        """What a rollout changes besides the weights: the random generators and the
        samplers' bookkeeping (copies, so that an abandoned rollout can be undone)."""
        rollout = self.parts.rollout
        return {
            "rng": self.parts.task_rng.getstate(),
            "tree_rng": rollout.tree_rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "length_predictor": copy.deepcopy(rollout.length_predictor),
            "reuse_buffer": copy.deepcopy(rollout.reuse_buffer),
            "history": copy.deepcopy(rollout.history),
            "eval_after_warmup": self.eval_after_warmup,
        }

    def set_rollout_state(self, state: dict[str, Any]) -> None:
        rollout = self.parts.rollout
        self.parts.task_rng.setstate(state["rng"])
        rollout.tree_rng.setstate(state["tree_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        rollout.length_predictor = copy.deepcopy(state["length_predictor"])
        rollout.reuse_buffer = copy.deepcopy(state["reuse_buffer"])
        if state.get("history") is not None:  # R³'s task history, within the configured bounds
            r3 = self.parts.config.rollout.r3
            rollout.history = state["history"].resized(r3.capacity, r3.max_tasks)
        self.eval_after_warmup = state["eval_after_warmup"]

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The whole model's weights on rank 0 (gathered from FSDP's shards; ``None`` on
        other ranks then), or ``None`` where ``save_pretrained`` reads the model itself."""
        if not self.sharded:
            return None
        full = {}
        for name, tensor in dp.full_tensors(self.parts.model):
            if self.parts.dist.is_main:
                full[name] = tensor.cpu()
        return full if self.parts.dist.is_main else None

    def save(self, step: int, carried: dict[str, Any], rollout: dict[str, Any] | None = None) -> None:
        """The checkpoint of ``step``: the model (whole, loadable by transformers), rank
        0's optimizer and every rank's rollout state (``rollout``, default
        :meth:`rollout_state`; with ``pending``, rollouts made for later steps) in one
        file, with the summary fields a resumed run ``carried`` over; under FSDP also the
        sharded model and optimizer through ``torch.distributed.checkpoint``."""
        p = self.parts
        ranks = dp.gather_objects(p.dist, rollout if rollout is not None else self.rollout_state())
        state = {
            "optimizer": None if self.sharded else p.optimizer.state_dict(),
            "lr_scheduler": p.lr_scheduler.state_dict(),
            **ranks[0],
            "ranks": ranks,
            "world_size": p.dist.world_size,
            "strategy": p.dist.strategy,
            "config": asdict(p.config),
            "summary": carried,
            "coefficients": self.coefficients(),
        }
        save_checkpoint(p.output_dir, step, p.model, state, p.config.trainer.keep_checkpoints, dist=p.dist,
                        weights=self.full_state_dict(), tokenizer=p.tokenizer,
                        write_shards=(lambda d: sharded_state(p.model, p.optimizer, d)) if self.sharded else None)

    def coefficients(self) -> dict[str, Any]:
        """The state of the coefficients that follow a target (adaptive entropy, KL in the
        reward), the same on every rank."""
        p = self.parts
        out = {}
        if p.policy_update.entropy_control is not None:
            out["entropy"] = p.policy_update.entropy_control.state_dict()
        if p.kl_reward is not None:
            out["kl_reward"] = p.kl_reward.controller.state_dict()
        return out

    def restore(self, path: Path, state: dict[str, Any] | None = None) -> int:
        """Load the checkpoint at ``path`` into the run's parts (and the KL reference,
        with ``algo.kl_coef > 0``); returns its step. The configured ``trainer.lr`` and
        ``weight_decay`` replace the saved optimizer's (they differ only when the resume
        allowed changes)."""
        p = self.parts
        state = state if state is not None else load_trainer_state(path)
        saved_world = int(state.get("world_size", 1))
        if saved_world != p.dist.world_size:
            raise ConfigError(f"{path} was written by {saved_world} process(es); this run has {p.dist.world_size}: "
                              f"resume with {saved_world} (each rank continues its own sampler state)")
        if self.sharded:
            if state.get("strategy") != "fsdp":
                raise ConfigError(f"{path} holds no sharded state (written with trainer.strategy="
                                  f"{state.get('strategy', 'none')}): resume with that strategy")
            load_sharded_state(p.model, p.optimizer, path)
        else:
            if state.get("optimizer") is None:
                raise ConfigError(f"{path} was written with trainer.strategy=fsdp: resume with trainer.strategy=fsdp")
            load_model_weights(p.model, path)
            p.optimizer.load_state_dict(state["optimizer"])
        tc, scheduler = p.config.trainer, p.lr_scheduler
        if state.get("lr_scheduler") is not None:
            scheduler.load_state_dict(state["lr_scheduler"])
        scheduler.base_lrs = [tc.lr for _ in p.optimizer.param_groups]
        for group, fn in zip(p.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["weight_decay"] = tc.lr, tc.weight_decay
            group["lr"] = tc.lr * fn(scheduler.last_epoch)
        self.set_rollout_state(state["ranks"][p.dist.rank] if "ranks" in state else state)
        saved = state.get("coefficients", {})
        if p.policy_update.entropy_control is not None and "entropy" in saved:
            p.policy_update.entropy_control.load_state_dict(saved["entropy"])
        if p.kl_reward is not None and "kl_reward" in saved:
            p.kl_reward.controller.load_state_dict(saved["kl_reward"])
        if p.config.algo.needs_reference:
            p.policy_update.ref_model = self.reference_copy()
            reference = checkpoint_dir(p.output_dir) / "reference"
            try:
                verify_checkpoint(reference)
            except CheckpointError as err:
                raise RunDirectoryError(f"the KL reference of the run cannot be loaded ({err}): restore it from a copy, "
                                        "or start a new run") from None
            load_model_weights(p.policy_update.ref_model, reference)
        return int(state["step"])

    def reference_copy(self) -> torch.nn.Module:
        """A frozen, whole copy of the current policy (the KL reference), with the policy's
        packed attention. Under FSDP it is built from the gathered weights; every rank
        holds one."""
        p = self.parts
        if not self.sharded:
            return frozen_copy(p.model)
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_config(p.model.config, torch_dtype=torch_dtype(p.config.model.dtype))
        ref.load_state_dict(dict(dp.full_tensors(p.model)), strict=False)
        if p.packing.shares_prefixes:  # its forward is packed like the policy's
            enable_shared_prefix(ref)
        return frozen(ref.to(p.device))

    def save_final(self, last_step: int) -> Path:
        """``final_model/``: the model and its tokenizer, loadable by ``from_pretrained``;
        a failed write (a full disk) removes what it wrote and raises
        :class:`CheckpointWriteError`."""
        p = self.parts
        final = p.output_dir / "final_model"
        weights = self.full_state_dict()  # every rank takes part in gathering FSDP shards

        def write() -> None:
            try:
                p.model.save_pretrained(final, state_dict=weights)
                p.tokenizer.save_pretrained(final)
            except WRITE_ERRORS:
                shutil.rmtree(final, ignore_errors=True)
                raise

        write_on_main(p.dist, write, str(final), last_step)
        return final
