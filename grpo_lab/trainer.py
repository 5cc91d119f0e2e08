"""The RL loop: collect groups of episodes, compute advantages, update, push weights, log.

The trainer receives the run's parts from :func:`~grpo_lab.build.build_run` and only
runs the loop; evaluation lives in :mod:`grpo_lab.evaluation`, what a checkpoint holds
and how a run resumes from it in :mod:`grpo_lab.checkpointing`.

One step:

1. ``tasks_per_step`` seeds, played by the configured sampler
   (:mod:`grpo_lab.rollout.samplers`: chain, tree or adaptive) on the backend; with
   ``trainer.async`` the rollout was made ahead, while earlier steps trained, within
   ``rollout.max_staleness`` versions (:mod:`grpo_lab.training.async_rollout`), and its
   rows older than the weights train off-policy.
2. Advantages from the registered estimator (``algo.estimator``) and modifiers, on
   rewards, with the invalid-action penalty placed as ``algo.penalty_placement`` says;
   with ``algo.drop_zero_std_groups`` the groups whose advantages are all zero leave the
   batch.
3. The update (:mod:`grpo_lab.training.update`): ``epochs_per_batch`` passes over the
   rows, each split into ``minibatches_per_epoch`` optimizer steps, each accumulated over
   micro-batches of ``micro_batch_size`` rows, each a forward, its loss and a backward
   (:func:`~grpo_lab.training.step.policy_gradient_backward`). The loss of every micro-batch is
   normalised by its whole mini-batch's counts
   (:class:`~grpo_lab.losses.LossScale`), so the gradient does not depend on the
   micro-batch size.
4. The new weights, policy version ``step + 1``, go to the backend (in process, or
   pushed to engines in their own processes).
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

import json
import logging
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .advantages import AdvantageOutput
from .build import RunParts, build_run
from .checkpointing import (CARRIED, RunCheckpoints, checked_resume_state, choose_start_on_every_rank, resume_advice,
                            save_reference)
from .config import Config
from .data import RolloutBatch
from .evaluation import (NO_SIGNAL_WARN_AFTER, check_fault_rate, eval_basis, evaluate, no_signal_warning,
                         rollout_metrics)
from .rollout.agent_loop import OverlongPromptError
from .rollout.backend import EngineError
from .rollout.faults import FaultLog
from .rollout.samplers import GroupNumbering
from .training import distributed as dp
from .training.async_rollout import Collected, RolloutAhead, mark_stale
from .training.checkpoint import CheckpointWriteError, checkpoint_dir, write_on_main
from .training.metrics_log import MetricsLogger, plot_metrics, progress_bar, reduce_record, show_step
from .training.resume import metrics_until
from .training.step import informative_rows, signal_mask, without_baseline_rows
from .training.stop import (Abandon, CheckpointFailed, EnvFaultRateExceeded, RunStopped, StopSignals, TrainingInterrupted,
                            signal_name)
from .training.warmup import supervised_warmup

__all__ = ["Trainer"]

log = logging.getLogger("grpo_lab")


#: what stops a run early, saving its last completed step (see :func:`how_it_stops`)
STOPPING = (Abandon, EnvFaultRateExceeded, OverlongPromptError, EngineError, CheckpointWriteError)


def how_it_stops(err: BaseException) -> tuple[type[RunStopped], str, bool, dict[str, Any]]:
    """The :class:`RunStopped` a run raises for ``err`` (one of :data:`STOPPING`), its
    reason, whether the last completed step is saved, and the exception's extra fields:
    a signal; too many failed episodes; an overlong prompt (``rollout.overlong_prompt=
    error``); an engine that does not answer, or a weight push that failed twice; a full
    disk (the last checkpoint written stays)."""
    if isinstance(err, Abandon):
        return TrainingInterrupted, f"stopped by {signal_name(err.signum)}", True, {"signum": err.signum}
    if isinstance(err, EnvFaultRateExceeded):
        return EnvFaultRateExceeded, str(err), True, {}
    if isinstance(err, CheckpointWriteError):
        return CheckpointFailed, str(err), False, {}
    return RunStopped, str(err), True, {}


class Trainer:
    """GRPO-family training of a causal LM agent on a text environment.

    Args:
        config: a validated or unvalidated :class:`~grpo_lab.config.Config`.
        output_dir: where metrics, the plot, the summary and the final model go.
        model, tokenizer: use these instead of building or loading from ``config.model``.
    """

    def __init__(self, config: Config, output_dir: str | Path | None = None, model=None, tokenizer=None) -> None:
        self.parts: RunParts = build_run(config, output_dir, model, tokenizer)
        p = self.parts
        self.config, self.dist, self.output_dir = p.config, p.dist, p.output_dir
        self.model, self.tokenizer, self.envs, self.backend = p.model, p.tokenizer, p.envs, p.backend
        self.rollout, self.policy_update = p.rollout, p.policy_update
        self.checkpoints = RunCheckpoints(p)
        self.logger: MetricsLogger | None = None  # rank 0's
        # where the run stands
        self._done_step, self._saved_step = -1, -1  # the last step completed, and saved
        self._dirty = False  # a step's update has begun and the step has not completed
        self._end_state: dict[str, Any] | None = None  # sampler state at the end of the last completed step
        self._summary: dict[str, Any] = {}
        self._earlier_parts: list[dict[str, Any]] = []  # the parts of the run before a resume
        self._part_start: tuple[float, int] | None = None  # (wall clock, first step) of this part of the run
        self._ahead: RolloutAhead | None = None  # trainer.async: the rollouts made ahead of training
        self._pending: dict[int, Collected] = {}  # rollouts a checkpoint kept, for the steps they were made for

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The frozen KL reference: the policy when RL starts (when ``algo.kl_coef > 0``)."""
        return self.policy_update.ref_model

    # ------------------------------------------------------------------ the run
    def train(self) -> dict[str, Any]:
        """Warm-up, then ``total_steps`` RL steps. Returns the summary (also written to
        ``summary.json``).

        Raises :class:`~grpo_lab.training.stop.RunStopped` when the run stops early (a
        signal: :class:`TrainingInterrupted`; too many failed episodes:
        :class:`EnvFaultRateExceeded`), after saving the last completed step and the
        summary."""
        cfg = self.config
        resume_point = choose_start_on_every_rank(self.dist, self.output_dir, cfg.trainer.resume_mode())
        resume_state = None if resume_point is None else checked_resume_state(cfg, resume_point[1])
        if self.dist.is_main:  # the metrics file is cut back to the checkpoint's step before the logger opens it
            history = metrics_until(self.output_dir, resume_point[0]) if resume_point is not None else []
            self.logger = MetricsLogger(self.output_dir, cfg.logger.wandb, cfg.logger.wandb_project, asdict(cfg))
            self.logger.history.extend(history)
        carried = dict(resume_state.get("summary", {})) if resume_state is not None else {}
        self._earlier_parts = carried.pop("parts", [])
        summary = self._summary = {"output_dir": str(self.output_dir), **carried}  # what earlier parts found
        self._done_step = self._saved_step = resume_point[0] if resume_point is not None else -1
        stop = StopSignals(deferred=self.dist.enabled)
        try:
            with stop:
                try:
                    self._run(summary, stop, resume_point, resume_state)
                except STOPPING as err:
                    stop.shield()
                    raise self._stop_run(summary, *how_it_stops(err)) from None
        finally:
            if self._ahead is not None:
                self._ahead.stop(timeout_s=0)  # no rollout starts now
            if self.logger is not None:
                self.logger.close()
            close = getattr(self.backend, "close", None)  # engines in their own processes stop with the run
            if close is not None:
                close()
            if self._ahead is not None:  # the rollout under way ends (its engine calls fail) before its envs close
                self._ahead.stop(timeout_s=30)
            self.envs.close()
        self._write_summary(summary)
        return summary

    def _run(self, summary: dict[str, Any], stop: StopSignals, resume_point, resume_state) -> None:
        """The run itself (see :meth:`train`): phases a signal may cut short run inside
        ``stop.abandonable()``."""
        cfg = self.config
        self._part_start = (time.perf_counter(), resume_point[0] + 1 if resume_point is not None else 0)
        start, pending = 0, []
        if resume_point is not None:
            start = self.checkpoints.restore(resume_point[1], resume_state) + 1
            pending = (resume_state.get("ranks") or [resume_state])[self.dist.rank].get("pending", [])
            self.push_weights(start)
            before = self.checkpoints.eval_after_warmup
            log.info("resumed from %s: continuing at step %d", resume_point[1], start)
        else:
            with stop.abandonable():
                warm = self.warmup()
            if warm:
                summary["warmup_loss_first"], summary["warmup_loss_last"] = warm[0], warm[-1]
                log.info("warm-up: %d steps, loss %.3f -> %.3f", len(warm), warm[0], warm[-1])
            if cfg.algo.needs_reference:
                self.policy_update.ref_model = self.checkpoints.reference_copy()
                if self.dist.is_main:
                    save_reference(self.output_dir, self.ref_model)
            with stop.abandonable():
                before = self.evaluate()
        self.checkpoints.eval_after_warmup = summary["eval_after_warmup"] = before
        if before:
            log.info("after warm-up: success rate %.3f %s", before["success_rate"], eval_basis(before))
        self._end_state = self.checkpoints.rollout_state()
        if cfg.trainer.async_rollout:
            self._ahead = RolloutAhead(self._produce, self.checkpoints.rollout_state, start, cfg.trainer.total_steps,
                                       cfg.rollout.max_staleness, version=start, pending=pending).start()
        else:
            self._pending = {c.step: c for c in pending}
        bar = progress_bar(cfg.trainer.total_steps, start) if cfg.logger.progress_bar and self.dist.is_main else None
        silent: list[dict[str, Any]] = []  # the run of consecutive steps without a learning signal
        try:
            for step in range(start, cfg.trainer.total_steps):
                record = self._step(step, stop)
                silent = silent + [record] if record.get("signal_rows") == 0 else []
                if len(silent) == NO_SIGNAL_WARN_AFTER:
                    log.warning("%s", no_signal_warning(silent))
                if bar is not None:
                    show_step(bar, record, len(silent))
                if cfg.trainer.checkpoint_every and (step + 1) % cfg.trainer.checkpoint_every == 0:
                    self._save(step)
                self._done_step, self._dirty = step, False
                if self._ahead is not None:
                    self._ahead.done(step)
                else:
                    self._end_state = self.checkpoints.rollout_state()
                if dp.any_rank(self.dist, stop.requested is not None):  # the step is complete: stop now
                    raise Abandon(stop.requested or signal.SIGTERM)
        finally:
            if bar is not None:
                bar.close()
            if self._ahead is not None:
                self._ahead.stop(timeout_s=0)
        if self._ahead is not None:
            self._ahead.stop()  # it made the last step's rollout and ended: the engines are free to evaluate
        with stop.abandonable():
            after = self.evaluate()
        summary["eval_final"] = after
        if after:
            log.info("final: success rate %.3f %s (after warm-up %.3f)", after["success_rate"], eval_basis(after),
                     before["success_rate"])
        summary.update(self._times(cfg.trainer.total_steps - 1))
        if cfg.logger.plot and self.dist.is_main:
            evals = {"after warm-up": (-0.5, before), "final": (cfg.trainer.total_steps - 0.5, after)}
            summary["plot"] = str(plot_metrics(self.logger.history, self.output_dir / "training_curves.png", evals))
        if cfg.trainer.save_final:
            summary["final_model"] = str(self.checkpoints.save_final(self._done_step))

    def _step(self, step: int, stop: StopSignals) -> dict[str, Any]:
        """One RL step: rollout (abandonable), fault check, advantages, update, weights to
        the engine, log."""
        cfg = self.config
        with stop.abandonable():
            rollout, waited = self._rollout(step)
        t_roll = time.perf_counter()
        batch = rollout.batch
        check_fault_rate(self.dist, rollout.faults, cfg.rollout.max_env_fault_rate, f"step {step}")
        record: dict[str, Any] = {"step": step, **rollout.faults.metrics(), **rollout.stats}
        staleness = mark_stale(batch, step)  # rows an older policy sampled train off-policy
        if self._ahead is not None or staleness["stale_rows_frac"] > 0:
            record.update(staleness)
        if self._ahead is not None:
            record["rollout_wait_time"] = waited
        record.update(getattr(self.backend, "engine_stats", {}))  # engines in their own processes: faults so far
        if dp.global_sums(self.dist, [len(batch)])[0] == 0:  # every group lost (only with a fault rate limit near 1)
            log.warning("step %d: every episode failed or lost its group; no update", step)
            record.update(num_rows=0, rollout_time=rollout.seconds, update_time=0.0)
            return self._log(reduce_record(self.dist, record, 0))
        if self.parts.kl_reward is not None:  # the KL to the reference leaves the rewards (every rank's forwards)
            batch, kl_metrics = self.parts.kl_reward.penalise(batch, self.policy_update)
            record.update(kl_metrics)
        advantages, extras = torch.zeros(0), {}  # [N], and the estimator's further [N] streams
        if len(batch):  # else this rank lost all its groups; the others train, and it joins their collectives
            adv_out = self.advantages(batch)
            # baseline episodes (ReMax's greedy ones) scored for the advantages; they do not train
            batch, advantages, extras = without_baseline_rows(batch, adv_out.advantages, adv_out.extras)
            record.update({**rollout_metrics(batch), **adv_out.metrics})
            record["signal_rows"] = int(signal_mask(advantages, extras).sum())  # 0 on every rank: nothing to learn
        train_batch = batch
        if cfg.algo.drop_zero_std_groups and len(batch):  # DAPO's dynamic sampling
            keep = informative_rows(batch.group_id, advantages)  # [N'] row indices
            record["rows_dropped"] = len(batch) - int(keep.numel())
            train_batch, advantages = batch.select(keep), advantages[keep]
            extras = {key: value[keep] for key, value in extras.items()}
        self._dirty = True  # from here until the step completes, the weights hold part of it
        self.backend.sleep()
        record.update(self.policy_update(train_batch, advantages, extras))
        self.backend.wake()
        self.push_weights(step + 1)
        if self._ahead is not None:
            self._ahead.publish(step + 1)
        record["rollout_time"] = rollout.seconds
        record["update_time"] = time.perf_counter() - t_roll
        return self._log(reduce_record(self.dist, record, len(batch)))

    # ------------------------------------------------------------------ phases
    def _rollout(self, step: int) -> tuple[Collected, float]:
        """The rollout step ``step`` trains on, and the seconds the trainer waited for it:
        made ahead (``trainer.async``), kept by the checkpoint resumed from, or made now."""
        if self._ahead is not None:
            return self._ahead.take(step)
        if step in self._pending:
            return self._pending.pop(step), 0.0
        t0 = time.perf_counter()
        batch, stats, faults = self._produce(step)
        return Collected(step, batch, stats, faults, time.perf_counter() - t0), 0.0

    def _produce(self, step: int) -> tuple[RolloutBatch, dict[str, Any], FaultLog]:
        """:meth:`collect`, with what the rollout counted."""
        batch = self.collect(step)
        return batch, self.rollout.stats, self.rollout.faults

    def collect(self, step: int) -> RolloutBatch:
        """This rank's episodes of the step: ``tasks_per_step`` seeds are drawn (the same on
        every rank), each rank plays its contiguous share with the configured sampler
        (``rollout.sampler``), so groups are never split. What the rollout cost goes to
        ``self.rollout.stats`` (logged with the step)."""
        T = self.config.trainer.tasks_per_step
        seeds = self.dist.shard([self.parts.task_rng.randrange(2**31) for _ in range(T)])
        numbering = GroupNumbering(step, T, offset=self.dist.rank * len(seeds))
        self.rollout.stats, self.rollout.faults = {}, FaultLog()
        try:
            return self.parts.sampler(self.rollout, seeds, numbering)
        finally:
            self.envs.clear()

    def advantages(self, batch: RolloutBatch) -> AdvantageOutput:
        """The configured estimator and modifiers on a non-empty ``batch`` (``algo.*``)."""
        return self.parts.advantages(batch)

    def warmup(self) -> list[float]:
        """Supervised warm-up on format-only demonstrations (``trainer.warmup``)."""
        p, wc = self.parts, self.config.trainer.warmup
        if wc.steps == 0:
            return []
        examples = p.episode_format.demonstrations(self.envs, wc.episodes, self.config.env.max_steps,
                                                   self.config.trainer.seed + 7, p.encoder, self.tokenizer.eos_token_id,
                                                   p.loop)
        if not examples:
            log.info("warm-up skipped: environment %r has no legal actions to demonstrate the answer format with "
                     "(or no demonstration fits the context)", self.config.env.name)
            return []
        with self.policy_update.autocast():
            losses = supervised_warmup(self.policy_update.module, examples, wc.steps, wc.batch_size, wc.lr,
                                       self.config.trainer.seed, p.pad_id)
        self.push_weights(0)
        return losses

    def evaluate(self) -> dict[str, float]:
        """The policy on the evaluation seeds (:func:`~grpo_lab.evaluation.evaluate`)."""
        p = self.parts
        return evaluate(self.backend, p.encoder, self.envs, p.loop, p.eval_seeds, self.config.trainer.eval_samples,
                        self.dist, self.config.rollout.max_env_fault_rate, self.rollout.episodes)

    def push_weights(self, version: int) -> None:
        """Send the training weights, policy ``version`` (the RL steps applied to them), to
        the backend: with LoRA the adapter alone, else the whole state dict. The state
        dict keeps tied aliases (``lm_head.weight`` beside the embedding): vLLM needs both
        names to update a tied output layer. Under FSDP each tensor is gathered as the
        engine takes it, so no full state dict is held."""
        if self.parts.lora:
            from .training.lora import adapter_state

            self.backend.load_adapter(*adapter_state(self.model), version=version)
            return
        self.backend.load_weights(dp.full_tensors(self.model), version=version)

    # ------------------------------------------------------------------ run control
    def _save(self, step: int, replay_from: int | None = None) -> None:
        """The checkpoint of ``step`` (:meth:`RunCheckpoints.save`), with the rollouts made
        for later steps (``trainer.async``: :meth:`RolloutAhead.state`; those before
        ``replay_from``)."""
        carried = {**{k: self._summary[k] for k in CARRIED if k in self._summary}, "parts": self._times(step)["parts"]}
        rollout = None
        if self._ahead is not None:
            rollout = self._ahead.state(step, replay_from)
        elif self._pending:  # resumed from an async run's checkpoint: what is left of its rollouts
            rollout = {**self.checkpoints.rollout_state(), "pending": [self._pending[s] for s in sorted(self._pending)]}
        self.checkpoints.save(step, carried, rollout)
        self._saved_step = step

    def _stop_run(self, summary: dict[str, Any], kind: type[RunStopped], reason: str, save: bool = True,
                  extra: dict[str, Any] | None = None) -> RunStopped:
        """Save the last completed step (unless saved already, or ``save`` is false: the
        stop is a failed save) and the summary; the exception to raise, with a message
        that says how to resume."""
        replay_from = self._done_step + 1 if kind is EnvFaultRateExceeded else None  # the refused rollout: again
        if self._ahead is not None:
            self._ahead.stop(timeout_s=0)  # the rollout under way is played again after the resume
        if self._done_step >= 0 and not self._dirty and save:
            if self._end_state is not None and self._ahead is None:
                self.checkpoints.set_rollout_state(self._end_state)  # undo what the abandoned phase drew
            if self._saved_step != self._done_step or self._ahead is not None:  # async: with the rollouts made since
                try:
                    self._save(self._done_step, replay_from)
                except CheckpointWriteError as err:
                    reason += f"; then {err}"
                    save = False
        if self._dirty and save:  # a second signal cut an update short: the weights are no step's
            reason += f" during the update of step {self._done_step + 1} (the weights in memory are not saved)"
        if self._dirty or not save:  # continue from the last checkpoint written
            self._done_step = self._saved_step
            self._end_state = None
        last = self._done_step
        checkpoint = str(checkpoint_dir(self.output_dir) / f"step_{last:06d}") if last >= 0 else None
        message = f"{reason}; last completed step: {last}; {resume_advice(self.output_dir, last, intact=not save)}"
        summary["stopped"] = {"reason": reason, "last_step": last, "checkpoint": checkpoint}
        if self._part_start is not None:
            summary.update(self._times(last))
        try:
            self._write_summary(summary)
        except OSError as err:  # the disk that refused the checkpoint may refuse this too
            log.error("summary.json could not be written: %s", err)
        log.error("%s", message)
        return kind(message, last_step=last, checkpoint=checkpoint, **(extra or {}))

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

    def _log(self, record: dict[str, Any]) -> dict[str, Any]:
        """Rank 0 writes the step's (reduced) metrics; a failed write (a full disk) stops
        the run at its last checkpoint (:class:`CheckpointWriteError`)."""
        write_on_main(self.dist, lambda: self.logger.log(record), f"the metrics of step {record.get('step')}",
                      record.get("step", -1))
        return record

    def _write_summary(self, summary: dict[str, Any]) -> None:
        if self.dist.is_main:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))

