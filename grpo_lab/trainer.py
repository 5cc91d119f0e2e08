"""The RL loop: collect groups of episodes, compute advantages, update, push weights, log.

One step:

1. ``tasks_per_step`` seeds, played by the configured sampler
   (:mod:`grpo_lab.rollout.samplers`: chain, tree or adaptive) on the backend.
2. Advantages from the registered estimator (``algo.estimator``) and modifiers, on
   rewards, with the invalid-action penalty placed as ``algo.penalty_placement`` says;
   with ``algo.drop_zero_std_groups`` the groups whose advantages are all zero leave the
   batch.
3. The update (:mod:`grpo_lab.training.update`): ``epochs_per_batch`` passes over the
   rows, each split into ``minibatches_per_epoch`` optimizer steps, each accumulated over
   micro-batches of ``micro_batch_size`` rows. The loss of every micro-batch is
   normalised by its whole mini-batch's counts
   (:class:`~grpo_lab.losses.LossScale`), so the gradient does not depend on the
   micro-batch size.
4. The new weights go to the backend in process.
5. The step's metrics, reduced over ranks, are logged by rank 0.

Under ``torchrun`` or ``accelerate launch`` every rank runs this loop on its share of
the step's tasks, with whole groups; the update is data-parallel (DDP or FSDP2) and
equals the single-process one (:mod:`grpo_lab.training.distributed`).

A run survives its environments: they live in worker processes
(``rollout.env_workers``), a failed episode leaves the batch and is counted
(:mod:`grpo_lab.rollout.faults`), and a step that loses more than
``rollout.max_env_fault_rate`` of its episodes stops the run. It survives its operator:
SIGTERM and SIGINT save the last completed step and stop with a message saying how to
resume (:mod:`grpo_lab.training.stop`); a resume checks the config against the saved
run's (:mod:`grpo_lab.training.resume`).

Rows with zero advantage contribute exactly zero to the clipped policy loss and its
gradient, so they are not run through the model (unless a KL or entropy term is on);
they still count in the loss normaliser, which keeps the gradient identical to running
them. Clip and entropy metrics are therefore over the rows with a learning signal.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .advantages import AdvantageOutput, compute_advantages
from .advantages.grouping import trajectory_table
from .config import Config, ConfigError, TrainerConfig
from .data import RolloutBatch
from .modeling import frozen, torch_dtype
from .rollout import AgentLoopConfig, LengthPredictor, PromptEncoder, SamplingParams, SchedulerConfig, run_episodes
from .rollout.adaptive import ReuseBuffer
from .rollout.agent_loop import OverlongPromptError
from .rollout.backends import BACKENDS
from .rollout.conversation import TemplateError
from .rollout.formats import EPISODE_FORMATS
from .rollout.env_pool import EnvRunner, EnvSpec
from .rollout.faults import FaultLog
from .rollout.samplers import GroupNumbering, RolloutContext, get_sampler
from .training import distributed as dp
from .training.checkpoint import (WRITE_ERRORS, CheckpointError, CheckpointWriteError, as_os_error, checkpoint_dir,
                         load_model_weights, load_sharded_state, load_trainer_state, save_checkpoint, sharded_state,
                         verify_checkpoint, write_manifest, write_on_main)
from .training.metrics_log import MetricsLogger, plot_metrics, reduce_record
from .training.pass_at_k import pass_at_k, pass_at_k_ks, success_counts
from .training.resume import RunDirectoryError, check_resume_config, choose_start, metrics_until
from .build import build_backend, build_model, context_length, env_factory_from, resolve_device
from .training.packing import PACKINGS
from .training.shared_prefix import check_attention_backend, enable_shared_prefix
from .training.verify import verify_shared_prefix
from .training.step import informative_rows, signal_mask
from .training.stop import (Abandon, CheckpointFailed, EnvFaultRateExceeded, RunStopped, StopSignals, TrainingInterrupted,
                   signal_name)
from .training.update import PolicyUpdate, build_lr_scheduler, build_optimizer, enable_gradient_checkpointing
from .training.warmup import supervised_warmup

__all__ = ["Trainer", "env_factory_from", "frozen_copy", "resolve_device", "save_reference"]

log = logging.getLogger("grpo_lab")

def save_reference(output_dir: Path, ref_model: torch.nn.Module) -> None:
    """The KL reference (the policy when RL starts), once, for resumed runs; written
    under a temporary name and renamed when complete."""
    import shutil

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


#: consecutive steps without a learning signal after which the run warns
NO_SIGNAL_WARN_AFTER = 3


def no_signal_warning(records: list[dict[str, Any]]) -> str:
    """The warning for consecutive step ``records`` in which every group's advantages
    were zero, with the likely cause read from their success rates."""
    steps = f"steps {records[0]['step']}-{records[-1]['step']}"
    success = [r.get("success_rate") for r in records if r.get("success_rate") is not None]
    if success and max(success) == 0:
        cause = ("no episode succeeds and every episode of a task gets the same reward: the task is too hard for the "
                 "policy, or its answers are never in the format the environment parses (a format warm-up, "
                 "trainer.warmup.steps, an easier task or a larger algo.group_size may help)")
    elif success and min(success) == 1:
        cause = "every episode succeeds with the same reward: the task is too easy for the policy (use a harder one)"
    else:
        cause = ("the reward does not tell the episodes of a task apart (a constant or coarse reward function, or "
                 "too few episodes per task: algo.group_size)")
    return (f"{steps}: every group's advantages were zero, so these {len(records)} steps trained nothing. "
            f"Likely cause: {cause}")


def eval_basis(result: dict[str, Any]) -> str:
    """What an evaluation's figures rest on: ``(over 60 of 64 eval episodes; 4 failed)``."""
    episodes, dropped = int(result.get("episodes", 0)), int(result.get("episodes_dropped", 0))
    failed = f"; {dropped} failed" if dropped else ""
    return f"(over {episodes} of {episodes + dropped} eval episodes{failed})"


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An evaluation-mode copy of ``model`` without gradients (the KL reference)."""
    return frozen(copy.deepcopy(model))


class Trainer:
    """GRPO-family training of a causal LM agent on a text environment.

    Args:
        config: a validated or unvalidated :class:`~grpo_lab.config.Config`.
        output_dir: where metrics, the plot, the summary and the final model go.
        model, tokenizer: use these instead of building or loading from ``config.model``.
    """

    def __init__(self, config: Config, output_dir: str | Path | None = None, model=None, tokenizer=None) -> None:
        self.config = config.validate()
        cfg = self.config
        tc = cfg.trainer
        try:
            self.mixed_precision = dp.resolve_mixed_precision(tc.mixed_precision)
        except ValueError as err:
            raise ConfigError(f"trainer.mixed_precision={tc.mixed_precision!r}: {err}") from None
        if self.mixed_precision != "no" and cfg.model.dtype != "float32":
            raise ConfigError(f"trainer.mixed_precision={self.mixed_precision!r} needs model.dtype=float32 (the master "
                              f"weights), got model.dtype={cfg.model.dtype!r}")
        world = dp.launched_world_size()
        if world > 1:
            self._check_data_parallel(world)
        self.dist, rank_device = dp.init_distributed(tc.strategy, tc.device)
        if self.dist.rank > 0:  # rank 0 speaks for the run
            log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
        # rank 0's directory for all (Hydra names one per process, by the second it started)
        self.output_dir = Path(dp.broadcast_object(self.dist, str(output_dir or tc.output_dir or "outputs")))
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(tc.seed)
        self.rng = random.Random(tc.seed)  # the step's task seeds: the same on every rank, each plays its slice
        self.device = rank_device or resolve_device(tc.device)
        env_factory_from(cfg)  # builds one environment in this process: bad env.kwargs stop here
        try:  # the episodes' environments: in worker processes with rollout.env_workers > 0
            self.envs = EnvRunner(EnvSpec.from_registry(cfg.env.name, dict(cfg.env.kwargs)), cfg.rollout.env_workers,
                                  cfg.env.step_timeout_s)
            self.envs.start()
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"rollout.env_workers={cfg.rollout.env_workers}: {err}") from None

        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if model is None:
            model, tokenizer = build_model(cfg, self.envs)
        self.model = model.to(self.device)
        self.packing = PACKINGS.get(tc.packing)
        if self.packing.shares_prefixes:
            try:
                check_attention_backend(tc.attention_backend)
            except RuntimeError as err:
                raise ConfigError(f"trainer.attention={tc.attention!r}: {err}") from None
            try:  # refuse a model the packed forward cannot be exact for, before any rollout
                enable_shared_prefix(self.model)
                verify_shared_prefix(self.model, tc.attention_backend, self.packing, *self.packed_lengths())
            except NotImplementedError as err:
                raise ConfigError(f"trainer.packing={tc.packing}: {err}") from None
        self.tokenizer = tokenizer
        mc = cfg.model
        self._vllm_source: str | None = None
        if BACKENDS.get(cfg.rollout.backend).from_disk and not mc.name_or_path:
            # the tiny model lives in memory: vLLM starts from a copy of the base model on disk
            self._vllm_source = str(self.output_dir / "initial_model")
            if self.dist.is_main:
                self.model.save_pretrained(self._vllm_source)
                tokenizer.save_pretrained(self._vllm_source)
            dp.barrier(self.dist)
        self.lora = mc.lora_r > 0
        if self.lora:
            from .training.lora import apply_lora

            try:
                self.model = apply_lora(self.model, mc.lora_r, mc.lora_alpha, mc.lora_dropout, mc.lora_target_modules)
            except ImportError as err:
                raise ConfigError(str(err)) from None
        if tc.gradient_checkpointing:
            try:
                enable_gradient_checkpointing(self.model)
            except ValueError as err:
                raise ConfigError(f"trainer.gradient_checkpointing=true: {err}") from None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        chat = {"auto": "auto", "true": True, "false": False}[str(cfg.rollout.use_chat_template).lower()]
        self.encoder = PromptEncoder(tokenizer, chat, cfg.rollout.system_prompt)
        self.episode_format = EPISODE_FORMATS.get(cfg.rollout.episode_format)
        try:  # the chat template is checked now, not at the first turn
            self.episode_format.check(self.encoder)
        except TemplateError as err:
            raise ConfigError(f"rollout.episode_format={self.episode_format.name}: {err}") from None
        self.backend = build_backend(cfg, self.model, tokenizer, self._vllm_source)  # before sharding: HF copies the model
        if self.dist.rank > 0:  # ranks sample differently; rank 0 draws as a single process does
            torch.manual_seed(tc.seed + 7919 * self.dist.rank)
        try:
            self.train_module = dp.wrap_model(self.dist, self.model, self.device, self.mixed_precision)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.optimizer = build_optimizer(self.model, tc.lr, tc.weight_decay)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, tc.lr_scheduler, tc.lr_warmup_steps, tc.optimizer_steps())
        self.policy_update = PolicyUpdate(
            self.train_module, self.optimizer, self.lr_scheduler, cfg.algo.objective(), self.packing, self.pad_id,
            self.device, epochs=tc.epochs_per_batch, minibatches=tc.minibatches_per_epoch,
            micro_batch_size=tc.micro_batch_size, micro_batch_tokens=tc.micro_batch_tokens,
            max_grad_norm=tc.max_grad_norm, max_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
            attention=tc.attention_backend, seed=tc.seed, mixed_precision=self.mixed_precision, dist=self.dist)
        self.sampling = SamplingParams(
            max_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            stop=self.envs.text_format.stop,
        )
        self.max_context = context_length(cfg, self.model)
        self.loop_config = AgentLoopConfig(
            group_size=cfg.algo.group_size,
            max_steps=cfg.env.max_steps,
            history_window=cfg.rollout.history_window,
            sampling=self.sampling,
            request_seed=tc.seed if cfg.rollout.request_seeds else None,
            max_context=self.max_context,
            overlong=cfg.rollout.overlong_prompt,
            env_threads=cfg.rollout.env_workers,
            episode_format=self.episode_format,
            max_episode_tokens=cfg.rollout.max_episode_tokens,
        )
        rc = cfg.rollout
        scheduler = None if rc.scheduler == "full" else SchedulerConfig(
            mode=rc.scheduler, max_inflight=rc.max_inflight,
            micro_group_size=rc.micro_group_size, order=rc.order, env_workers=rc.env_workers,
        )
        rank_seed = tc.seed + 104729 * self.dist.rank
        self.rollout = RolloutContext(
            backend=self.backend, encoder=self.encoder, envs=self.envs, loop=self.loop_config, rollout=rc,
            scheduler=scheduler, length_predictor=LengthPredictor(),
            reuse_buffer=ReuseBuffer(rc.adaptive.buffer_size, random.Random(rank_seed + 17)),
            tree_rng=random.Random(rank_seed + 29),
        )
        self.sampler = get_sampler(rc.sampler)
        self._end_state: dict[str, Any] | None = None  # sampler state at the end of the last completed step
        self._done_step, self._saved_step = -1, -1
        self._dirty = False  # a step's update has begun and the step has not completed
        self._resumed_eval: dict[str, float] = {}
        self._summary: dict[str, Any] = {}
        self._earlier_parts: list[dict[str, Any]] = []  # the parts before a resume
        self._part_start: tuple[float, int] | None = None  # (wall clock, first step) of this part of the run
        eval_rng = random.Random(tc.seed + 1_000_003)
        self.eval_seeds = [eval_rng.randrange(2**31) for _ in range(tc.eval_episodes)]
        self.logger: MetricsLogger | None = None

    def packed_lengths(self) -> tuple[int | None, int | None]:
        """``(longest row, longest packed sequence)`` the update may see (``None``: no
        bound): rows within the context and ``rollout.max_episode_tokens``; a
        micro-batch of ``trainer.micro_batch_size`` of them, or under a prefix-sharing
        packing ``trainer.micro_batch_tokens`` encoded (one row past it goes alone)."""
        cfg = self.config
        bounds = [b for b in (context_length(cfg, self.model), cfg.rollout.max_episode_tokens) if b is not None]
        row = min(bounds) if bounds else None
        if row is None:
            return None, None
        packed = cfg.trainer.micro_batch_size * row
        if cfg.trainer.micro_batch_tokens is not None and self.packing.shares_prefixes:
            packed = min(packed, max(cfg.trainer.micro_batch_tokens, row))
        return row, packed

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The frozen KL reference: the policy when RL starts (when ``algo.kl_coef > 0``)."""
        return self.policy_update.ref_model

    @ref_model.setter
    def ref_model(self, model: torch.nn.Module | None) -> None:
        self.policy_update.ref_model = model

    def update(self, batch: RolloutBatch, advantages: Tensor, extras: dict[str, Tensor] | None = None) -> dict[str, float]:
        """The update phase on this rank's rows (:class:`~grpo_lab.training.update.PolicyUpdate`)."""
        return self.policy_update(batch, advantages, extras)

    def _check_data_parallel(self, world: int) -> None:
        """Settings that cannot run on ``world`` ranks, refused before anything starts."""
        cfg = self.config
        tc = cfg.trainer
        if tc.tasks_per_step % world:
            raise ConfigError(f"trainer.tasks_per_step={tc.tasks_per_step} must be divisible by the {world} processes "
                              "(each rank plays whole groups of an equal share of the step's tasks)")
        if dp.resolve_strategy(tc.strategy, world) == "fsdp" and cfg.model.lora_r > 0:
            raise ConfigError(f"model.lora_r={cfg.model.lora_r} with trainer.strategy=fsdp: a LoRA run trains only its "
                              "adapter; use trainer.strategy=ddp")
        if cfg.rollout.vllm_tensor_parallel_size > 1:
            raise ConfigError(f"rollout.vllm_tensor_parallel_size={cfg.rollout.vllm_tensor_parallel_size} under {world} "
                              "training processes: each rank runs its own one-GPU engine; tensor-parallel engines are "
                              "supported in single-process runs only")

    # properties kept for readers of the single-process trainer
    @property
    def rollout_stats(self) -> dict[str, float]:
        return self.rollout.stats

    @property
    def faults(self) -> FaultLog:
        return self.rollout.faults

    # ------------------------------------------------------------------ weights to the engine
    def push_weights(self) -> None:
        """Send the training weights to the backend: with LoRA the adapter alone, else the
        whole state dict. The state dict keeps tied aliases (``lm_head.weight`` beside the
        embedding): vLLM needs both names to update a tied output layer. Under FSDP each
        tensor is gathered as the engine takes it, so no full state dict is held."""
        if self.lora:
            from .training.lora import adapter_state

            self.backend.load_adapter(*adapter_state(self.model))
            return
        self.backend.load_weights(dp.full_tensors(self.model))

    # ------------------------------------------------------------------ phases
    def warmup(self) -> list[float]:
        """Supervised warm-up on format-only demonstrations (``trainer.warmup``)."""
        wc = self.config.trainer.warmup
        if wc.steps == 0:
            return []
        examples = self.episode_format.demonstrations(self.envs, wc.episodes, self.config.env.max_steps,
                                                      self.config.trainer.seed + 7, self.encoder,
                                                      self.tokenizer.eos_token_id, self.loop_config)
        if not examples:
            log.info("warm-up skipped: environment %r has no legal actions to demonstrate the answer format with "
                     "(or no demonstration fits the context)", self.config.env.name)
            return []
        with dp.autocast(self.device, self.mixed_precision, self.dist.strategy):
            losses = supervised_warmup(self.train_module, examples, wc.steps, wc.batch_size, wc.lr, self.config.trainer.seed,
                                       self.pad_id)
        self.push_weights()
        return losses

    def collect(self, step: int) -> RolloutBatch:
        """This rank's episodes of the step: ``tasks_per_step`` seeds are drawn (the same on
        every rank), each rank plays its contiguous share with the configured sampler
        (``rollout.sampler``), so groups are never split. What the rollout cost goes to
        ``self.rollout_stats`` (logged with the step)."""
        T = self.config.trainer.tasks_per_step
        seeds = self.dist.shard([self.rng.randrange(2**31) for _ in range(T)])
        numbering = GroupNumbering(step, T, offset=self.dist.rank * len(seeds))
        self.rollout.stats, self.rollout.faults = {}, FaultLog()
        try:
            return self.sampler(self.rollout, seeds, numbering)
        finally:
            self.envs.clear()

    def evaluate(self) -> dict[str, float]:
        """Success rate, mean return, invalid-action rate and episode length over
        ``trainer.eval_samples`` sampled episodes from each evaluation seed (over the
        ``episodes`` that did not fail; ``episodes_dropped`` counts the others), and with more
        than one sample per seed, ``pass@k`` (:mod:`grpo_lab.training.pass_at_k`). An
        evaluation that loses more than ``rollout.max_env_fault_rate`` of its episodes stops
        the run (:class:`EnvFaultRateExceeded`), as a rollout does."""
        if not self.eval_seeds:
            return {}
        n = self.config.trainer.eval_samples
        config = replace(self.loop_config, group_size=n, request_seed=None)
        faults = FaultLog()
        seeds = self.eval_seeds[self.dist.rank::self.dist.world_size]  # each rank plays its share
        try:
            batch = run_episodes(self.backend, self.encoder, self.envs, seeds, config, faults=faults)
        finally:
            self.envs.clear()
        self._check_fault_rate(faults, f"evaluation ({len(self.eval_seeds)} tasks x {n} samples)", evaluation=True)
        won = batch.trajectory_success()  # an empty batch (every episode failed) gives empty columns
        ks = pass_at_k_ks(n) if n > 1 else []
        per_k = []
        if ks:
            _, task, _ = trajectory_table(batch.reward, batch.traj_id, batch.group_id)  # in won's episode order
            samples, correct = success_counts(task, won)
            for k in ks:  # a task that lost episodes to faults counts for the k it still has
                keep = samples >= k
                per_k += [float(pass_at_k(samples[keep], correct[keep], k).sum()), float(keep.sum())]
        success, returns, episodes, invalid, rows, dropped, *sums = dp.global_sums(self.dist, [
            float(won.sum()), float(batch.trajectory_returns().sum()), float(won.numel()),
            float((~batch.valid_action).sum()), float(len(batch)), float(faults.episodes_dropped), *per_k])
        if episodes == 0:  # every episode failed, under rollout.max_env_fault_rate=1
            nan = float("nan")
            log.warning("evaluation: all %d episodes failed; no success rate", int(dropped))
            return {"success_rate": nan, "reward_mean": nan, "invalid_action_rate": nan, "episode_length": nan,
                    "episodes": 0, "episodes_dropped": int(dropped)}
        out = {"success_rate": success / episodes, "reward_mean": returns / episodes, "invalid_action_rate": invalid / rows,
               "episode_length": rows / episodes, "episodes": int(episodes), "episodes_dropped": int(dropped)}
        for k, total, tasks in zip(ks, sums[0::2], sums[1::2]):
            out[f"pass@{k}"] = total / tasks if tasks else float("nan")
        return out

    # ------------------------------------------------------------------ the loop
    def step_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        success = batch.trajectory_success().float()
        _, per_traj = torch.unique(batch.traj_id, return_counts=True)
        return {
            "reward_mean": float(batch.trajectory_returns().mean()),
            "success_rate": float(success.mean()),
            "episode_length": float(per_traj.float().mean()),
            "episodes": int(per_traj.numel()),
            "invalid_action_rate": float((~batch.valid_action).float().mean()),
            "env_steps": int(batch.valid_action.sum()),  # actions the environment carried out (tool calls)
            "num_rows": len(batch),
            "response_tokens": batch.num_response_tokens(),
            **{f"reward/{name}": mean for name, mean in batch.reward_part_means().items()},
        }

    def train(self) -> dict[str, Any]:
        """Warm-up, then ``total_steps`` RL steps. Returns the summary (also written to
        ``summary.json``).

        Raises :class:`~grpo_lab.training.stop.RunStopped` when the run stops early (a
        signal: :class:`TrainingInterrupted`; too many failed episodes:
        :class:`EnvFaultRateExceeded`), after saving the last completed step and the
        summary."""
        cfg = self.config
        resume_point = self._choose_start()
        history: list[dict[str, Any]] = []
        resume_state = None
        if resume_point is not None:
            resume_state = load_trainer_state(resume_point[1])
            harmless = TrainerConfig.HARMLESS_ON_RESUME
            if cfg.trainer.lr_scheduler != "constant":  # the schedule's length is the run's
                harmless = tuple(k for k in harmless if k != "trainer.total_steps")
            check_resume_config(resume_state.get("config"), asdict(cfg), harmless,
                                cfg.trainer.resume_allow_changes, defaults=asdict(Config().validate()))
            if self.dist.is_main:
                history = metrics_until(self.output_dir, resume_point[0])
        if self.dist.is_main:
            self.logger = MetricsLogger(self.output_dir, cfg.logger.wandb, cfg.logger.wandb_project, asdict(cfg))
            self.logger.history.extend(history)
        summary: dict[str, Any] = {"output_dir": str(self.output_dir)}
        carried = dict(resume_state.get("summary", {})) if resume_state is not None else {}  # older checkpoints: {}
        self._earlier_parts = carried.pop("parts", [])
        summary.update(carried)  # what the earlier parts of the run found
        self._summary = summary
        self._done_step = self._saved_step = resume_point[0] if resume_point is not None else -1
        stop = StopSignals(deferred=self.dist.enabled)
        try:
            with stop:
                try:
                    self._run(summary, stop, resume_point, resume_state)
                except Abandon as abandon:
                    stop.shield()
                    raise self._stop_run(summary, TrainingInterrupted, f"stopped by {signal_name(abandon.signum)}",
                                         signum=abandon.signum) from None
                except EnvFaultRateExceeded as err:
                    stop.shield()
                    raise self._stop_run(summary, EnvFaultRateExceeded, str(err)) from None
                except OverlongPromptError as err:  # rollout.overlong_prompt=error
                    stop.shield()
                    raise self._stop_run(summary, RunStopped, str(err)) from None
                except CheckpointWriteError as err:  # a full disk: stop at the last checkpoint written
                    stop.shield()
                    raise self._stop_run(summary, CheckpointFailed, str(err), save=False) from None
        finally:
            if self.logger is not None:
                self.logger.close()
            self.envs.close()
        self._write_summary(summary)
        return summary

    #: summary fields a resumed run carries over from the checkpoint it starts from
    CARRIED = ("warmup_loss_first", "warmup_loss_last")

    def _times(self, last_step: int) -> dict[str, Any]:
        """``parts``: the wall time of each part of the run (a first run and each resume),
        with the steps it took up to ``last_step``; ``train_seconds``: their sum;
        ``steps_without_signal``: the steps so far that trained nothing (every group's
        advantages zero)."""
        started, first = self._part_start
        parts = [*self._earlier_parts,
                 {"first_step": first, "last_step": last_step, "seconds": round(time.perf_counter() - started, 3)}]
        out: dict[str, Any] = {"parts": parts, "train_seconds": round(sum(p["seconds"] for p in parts), 3)}
        if self.logger is not None:  # rank 0: steps in which every group's advantages were zero
            out["steps_without_signal"] = sum(r.get("signal_rows") == 0 for r in self.logger.history)
        return out

    def _write_summary(self, summary: dict[str, Any]) -> None:
        if self.dist.is_main:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def _choose_start(self):
        """:func:`~grpo_lab.training.resume.choose_start` on rank 0 (it moves files), its
        answer or its refusal given to every rank."""
        if not self.dist.enabled:
            return choose_start(self.output_dir, self.config.trainer.resume_mode())
        answer: Any = None
        if self.dist.is_main:
            try:
                answer = ("ok", choose_start(self.output_dir, self.config.trainer.resume_mode()))
            except (FileExistsError, FileNotFoundError, ValueError) as err:
                answer = ("error", err)
        answer = dp.broadcast_object(self.dist, answer)
        if answer[0] == "error":
            raise answer[1]
        point = answer[1]
        return None if point is None else (point[0], Path(point[1]))

    def _run(self, summary: dict[str, Any], stop: StopSignals, resume_point, resume_state) -> None:
        """The run itself (see :meth:`train`): phases a signal may cut short run inside
        ``stop.abandonable()``."""
        cfg = self.config
        self._part_start = (time.perf_counter(), resume_point[0] + 1 if resume_point is not None else 0)
        start = 0
        if resume_point is not None:
            start = self._restore(resume_point[1], resume_state) + 1
            before = self._resumed_eval
            log.info("resumed from %s: continuing at step %d", resume_point[1], start)
        else:
            with stop.abandonable():
                warm = self.warmup()
            if warm:
                summary["warmup_loss_first"], summary["warmup_loss_last"] = warm[0], warm[-1]
                log.info("warm-up: %d steps, loss %.3f -> %.3f", len(warm), warm[0], warm[-1])
            if cfg.algo.kl_coef > 0:
                self.ref_model = self._reference_copy()
                if self.dist.is_main:
                    save_reference(self.output_dir, self.ref_model)
            with stop.abandonable():
                before = self.evaluate()
        self._resumed_eval = before
        summary["eval_after_warmup"] = before
        if before:
            log.info("after warm-up: success rate %.3f %s", before["success_rate"], eval_basis(before))
        self._end_state = self.rollout_state()
        bar = self._progress(cfg.trainer.total_steps) if self.dist.is_main else None
        if bar is not None and start:
            bar.update(start)
        silent: list[dict[str, Any]] = []  # the run of consecutive steps without a learning signal
        try:
            for step in range(start, cfg.trainer.total_steps):
                record = self._step(step, stop)
                silent = silent + [record] if record.get("signal_rows") == 0 else []
                if len(silent) == NO_SIGNAL_WARN_AFTER:
                    log.warning("%s", no_signal_warning(silent))
                if bar is not None:
                    postfix = {"reward": f"{record.get('reward_mean', float('nan')):.2f}",
                               "success": f"{record.get('success_rate', float('nan')):.2f}"}
                    if silent:
                        postfix["no signal"] = f"{len(silent)} step{'s' if len(silent) > 1 else ''}"
                    bar.set_postfix(postfix)
                    bar.update(1)
                if cfg.trainer.checkpoint_every and (step + 1) % cfg.trainer.checkpoint_every == 0:
                    self._save(step)
                self._done_step, self._dirty = step, False
                self._end_state = self.rollout_state()
                if dp.any_rank(self.dist, stop.requested is not None):  # the step is complete: stop now
                    raise Abandon(stop.requested or signal.SIGTERM)
        finally:
            if bar is not None:
                bar.close()
        with stop.abandonable():
            after = self.evaluate()
        summary["eval_final"] = after
        if after:
            log.info("final: success rate %.3f %s (after warm-up %.3f)", after["success_rate"], eval_basis(after),
                     before["success_rate"])
        summary.update(self._times(cfg.trainer.total_steps - 1))
        if cfg.logger.plot and self.dist.is_main:
            evals = {"after warm-up": (-0.5, before),
                     "final": (cfg.trainer.total_steps - 0.5, after)}
            summary["plot"] = str(plot_metrics(self.logger.history, self.output_dir / "training_curves.png", evals))
        if cfg.trainer.save_final:
            summary["final_model"] = str(self._save_final())

    def _save_final(self) -> Path:
        """``final_model/``: the model and its tokenizer, loadable by ``from_pretrained``;
        a failed write (a full disk) removes what it wrote and raises
        :class:`CheckpointWriteError`."""
        import shutil

        final = self.output_dir / "final_model"
        weights = self._full_state_dict()  # every rank takes part in gathering FSDP shards

        def write() -> None:
            try:
                self.model.save_pretrained(final, state_dict=weights)
                self.tokenizer.save_pretrained(final)
            except WRITE_ERRORS:
                shutil.rmtree(final, ignore_errors=True)
                raise

        write_on_main(self.dist, write, str(final), self._done_step)
        return final

    def _step(self, step: int, stop: StopSignals) -> dict[str, Any]:
        """One RL step: rollout (abandonable), fault check, advantages, update, log."""
        cfg = self.config
        t_step = time.perf_counter()
        with stop.abandonable():
            batch = self.collect(step)
        t_roll = time.perf_counter()
        self._check_fault_rate(self.faults, f"step {step}")
        record: dict[str, Any] = {"step": step, **self.faults.metrics(), **self.rollout_stats}
        if dp.global_sums(self.dist, [len(batch)])[0] == 0:  # every group lost (only with a fault rate limit near 1)
            log.warning("step %d: every episode failed or lost its group; no update", step)
            record.update(num_rows=0, rollout_time=t_roll - t_step, update_time=0.0)
            return self._log(reduce_record(self.dist, record, 0))
        if len(batch) == 0:  # this rank lost all its groups; the others train, and it joins their collectives
            train_batch, advantages, extras = batch, torch.zeros(0), {}
        else:
            adv_out = self.advantages(batch)
            record.update({**self.step_metrics(batch), **adv_out.metrics})
            train_batch, advantages, extras = batch, adv_out.advantages, adv_out.extras
            record["signal_rows"] = int(signal_mask(advantages, extras).sum())  # 0 on every rank: nothing to learn
        if cfg.algo.drop_zero_std_groups and len(batch):
            keep = informative_rows(batch.group_id, advantages)
            record["rows_dropped"] = len(batch) - int(keep.numel())
            train_batch, advantages = batch.select(keep), advantages[keep]
            extras = {key: value[keep] for key, value in extras.items()}
        self._dirty = True  # from here until the step completes, the weights hold part of it
        self.backend.sleep()
        record.update(self.update(train_batch, advantages, extras))
        self.backend.wake()
        self.push_weights()
        record["rollout_time"] = t_roll - t_step
        record["update_time"] = time.perf_counter() - t_roll
        return self._log(reduce_record(self.dist, record, len(batch)))

    def advantages(self, batch: RolloutBatch) -> AdvantageOutput:
        """The configured estimator and modifiers on a non-empty ``batch`` (``algo.*``)."""
        ac = self.config.algo
        return compute_advantages(batch, ac.estimator, ac.invalid_action_penalty, ac.params, ac.modifier_settings(),
                                  ac.penalty_placement)

    def _log(self, record: dict[str, Any]) -> dict[str, Any]:
        """Rank 0 writes the step's (reduced) metrics; a failed write (a full disk) stops
        the run at its last checkpoint (:class:`CheckpointWriteError`)."""
        write_on_main(self.dist, lambda: self.logger.log(record), f"the metrics of step {record.get('step')}",
                      record.get("step", -1))
        return record

    def _check_fault_rate(self, faults: FaultLog, phase: str, evaluation: bool = False) -> None:
        """Stop (:class:`EnvFaultRateExceeded`) when ``phase`` (a step's rollout, or an
        ``evaluation``) lost more than ``rollout.max_env_fault_rate`` of its episodes."""
        limit = self.config.rollout.max_env_fault_rate
        episodes, dropped = dp.global_sums(self.dist, [faults.episodes, faults.episodes_dropped])
        if episodes == 0 or dropped / episodes <= limit:
            return
        counts = ", ".join(f"{k}={v}" for k, v in faults.metrics().items() if v and k != "episodes_dropped")
        examples = "\n".join(f"  {line}" for line in faults.examples)
        judged = ("the success rate of the episodes that happened to run would not be the policy's" if evaluation
                  else "training on the episodes that happened to run would bias the batch")
        raise EnvFaultRateExceeded(
            f"{phase}: {int(dropped)} of {int(episodes)} episodes failed ({'this rank: ' if self.dist.enabled else ''}"
            f"{counts}), more than rollout.max_env_fault_rate={limit:g}; {judged}. First faults:\n{examples}\n"
            "Fix the environment (or raise rollout.max_env_fault_rate), then resume")

    def _stop_run(self, summary: dict[str, Any], kind: type[RunStopped], reason: str, save: bool = True,
                  **extra) -> RunStopped:
        """Save the last completed step (unless saved already, or ``save`` is false: the
        stop is a failed save) and the summary; the exception to raise, with a message
        that says how to resume."""
        if self._done_step >= 0 and not self._dirty and save:
            if self._end_state is not None:
                self.set_rollout_state(self._end_state)  # undo what the abandoned phase drew
            if self._saved_step != self._done_step:
                try:
                    self._save(self._done_step)
                except CheckpointWriteError as err:
                    reason += f"; then {err}"
                    save = False
        if self._dirty and save:  # a second signal cut an update short: the weights are no step's
            reason += f" during the update of step {self._done_step + 1} (the weights in memory are not saved)"
        if self._dirty or not save:  # continue from the last checkpoint written
            self._done_step = self._saved_step
            self._end_state = None
        checkpoint = None
        if self._done_step >= 0:
            checkpoint = str(checkpoint_dir(self.output_dir) / f"step_{self._done_step:06d}")
            how = (f"to continue from step {self._done_step + 1}, run again with trainer.output_dir={self.output_dir} "
                   "trainer.resume=true (and the same other settings)")
            if not save:
                how = f"the checkpoint of step {self._done_step} is intact; {how}"
        else:
            how = (f"there is no checkpoint to continue from: run again with trainer.output_dir={self.output_dir} "
                   "trainer.resume=auto to start afresh")
        message = f"{reason}; last completed step: {self._done_step}; {how}"
        summary["stopped"] = {"reason": reason, "last_step": self._done_step, "checkpoint": checkpoint}
        if self._part_start is not None:
            summary.update(self._times(self._done_step))
        try:
            self._write_summary(summary)
        except OSError as err:  # the disk that refused the checkpoint may refuse this too
            log.error("summary.json could not be written: %s", err)
        log.error("%s", message)
        return kind(message, last_step=self._done_step, checkpoint=checkpoint, **extra)

    # ------------------------------------------------------------------ checkpoints
    def rollout_state(self) -> dict[str, Any]:
        """What a rollout changes besides the weights: the random generators and the
        samplers' bookkeeping (copies, so that an abandoned rollout can be undone)."""
        return {
            "rng": self.rng.getstate(),
            "tree_rng": self.rollout.tree_rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "length_predictor": copy.deepcopy(self.rollout.length_predictor),
            "reuse_buffer": copy.deepcopy(self.rollout.reuse_buffer),
            "eval_after_warmup": self._resumed_eval,
        }

    def set_rollout_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.rollout.tree_rng.setstate(state["tree_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.rollout.length_predictor = copy.deepcopy(state["length_predictor"])
        self.rollout.reuse_buffer = copy.deepcopy(state["reuse_buffer"])
        self._resumed_eval = state["eval_after_warmup"]

    @property
    def _sharded(self) -> bool:
        return self.dist.strategy == "fsdp"

    def _full_state_dict(self) -> dict[str, Tensor] | None:
        """The whole model's weights on rank 0 (gathered from FSDP's shards; ``None`` on
        other ranks then), or ``None`` where ``save_pretrained`` reads the model itself."""
        if not self._sharded:
            return None
        full = {}
        for name, tensor in dp.full_tensors(self.model):
            if self.dist.is_main:
                full[name] = tensor.cpu()
        return full if self.dist.is_main else None

    def _save(self, step: int) -> None:
        """The checkpoint of ``step``: the model (whole, loadable by transformers), rank
        0's optimizer and every rank's rollout state in one file; under FSDP also the
        sharded model and optimizer through ``torch.distributed.checkpoint``."""
        ranks = dp.gather_objects(self.dist, self.rollout_state())
        state = {
            "optimizer": None if self._sharded else self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            **ranks[0],
            "ranks": ranks,
            "world_size": self.dist.world_size,
            "strategy": self.dist.strategy,
            "config": asdict(self.config),
            "summary": {**{k: self._summary[k] for k in self.CARRIED if k in self._summary},
                        "parts": self._times(step)["parts"]},
        }
        save_checkpoint(self.output_dir, step, self.model, state, self.config.trainer.keep_checkpoints, dist=self.dist,
                        weights=self._full_state_dict(), tokenizer=self.tokenizer,
                        write_shards=(lambda d: sharded_state(self.model, self.optimizer, d)) if self._sharded else None)
        self._saved_step = step

    def _restore(self, path: Path, state: dict[str, Any] | None = None) -> int:
        """Load the checkpoint at ``path`` into this trainer; returns its step. The
        configured ``trainer.lr`` and ``weight_decay`` replace the saved optimizer's (they
        differ only when the resume allowed changes)."""
        state = state if state is not None else load_trainer_state(path)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise ConfigError(f"{path} was written by {saved_world} process(es); this run has {self.dist.world_size}: "
                              f"resume with {saved_world} (each rank continues its own sampler state)")
        if self._sharded:
            if state.get("strategy") != "fsdp":
                raise ConfigError(f"{path} holds no sharded state (written with trainer.strategy="
                                  f"{state.get('strategy', 'none')}): resume with that strategy")
            load_sharded_state(self.model, self.optimizer, path)
        else:
            if state.get("optimizer") is None:
                raise ConfigError(f"{path} was written with trainer.strategy=fsdp: resume with trainer.strategy=fsdp")
            load_model_weights(self.model, path)
            self.optimizer.load_state_dict(state["optimizer"])
        tc = self.config.trainer
        if state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.lr_scheduler.base_lrs = [tc.lr for _ in self.optimizer.param_groups]
        for group, fn in zip(self.optimizer.param_groups, self.lr_scheduler.lr_lambdas):
            group["initial_lr"], group["weight_decay"] = tc.lr, tc.weight_decay
            group["lr"] = tc.lr * fn(self.lr_scheduler.last_epoch)
        self.set_rollout_state(state["ranks"][self.dist.rank] if "ranks" in state else state)
        if self.config.algo.kl_coef > 0:
            self.ref_model = self._reference_copy()
            reference = checkpoint_dir(self.output_dir) / "reference"
            try:
                verify_checkpoint(reference)
            except CheckpointError as err:
                raise RunDirectoryError(f"the KL reference of the run cannot be loaded ({err}): restore it from a copy, "
                                        "or start a new run") from None
            load_model_weights(self.ref_model, reference)
        self.push_weights()
        return int(state["step"])

    def _reference_copy(self) -> torch.nn.Module:
        """A frozen, whole copy of the current policy (the KL reference), with the policy's
        packed attention. Under FSDP it is built from the gathered weights; every rank
        holds one."""
        if not self._sharded:
            return frozen_copy(self.model)
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_config(self.model.config, torch_dtype=torch_dtype(self.config.model.dtype))
        ref.load_state_dict(dict(dp.full_tensors(self.model)), strict=False)
        if self.packing.shares_prefixes:  # its forward is packed like the policy's
            enable_shared_prefix(ref)
        return frozen(ref.to(self.device))

    def _progress(self, total: int):
        if not self.config.logger.progress_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="GRPO", unit="step", dynamic_ncols=True)
