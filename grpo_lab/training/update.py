"""The update phase: optimizer steps on one rollout batch.

``epochs_per_batch`` passes over the rows, each split into ``minibatches_per_epoch``
optimizer steps, each accumulated over micro-batches
(:func:`~grpo_lab.training.step.policy_gradient_backward`, whose normalisers make the
gradient independent of the micro-batch size and, under data parallelism, of how the
groups are spread over ranks). Gradients are clipped to ``max_grad_norm``; the learning
rate follows ``trainer.lr_scheduler``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..data import RolloutBatch
from ..losses import Objective
from .distributed import SINGLE, DistContext, autocast, clip_grad_norm, lockstep_count, reduce_means
from .packing import Packing
from .step import RunningMeans, idle_forward, micro_groups, policy_gradient_backward, split_micro_batches

#: ``trainer.lr_scheduler`` -> transformers' schedule with linear warm-up
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the LoRA adapter alone under LoRA)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    """transformers' schedule ``name`` (``constant``, ``linear``, ``cosine``) over
    ``total_steps`` optimizer steps, after ``warmup_steps`` of linear warm-up from 0."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[name], optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant
    checkpoints: exact gradients, and they work with frozen embeddings and LoRA)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


@dataclass
class PolicyUpdate:
    """The optimizer steps of a run.

    Args:
        module: what the forward runs through: the model, or its DDP / FSDP wrapping.
        optimizer, scheduler: over ``module``'s parameters.
        objective: the loss (``AlgoConfig.objective()``).
        packing: the training forward of the policy, the reference and the old log-probs.
        epochs, minibatches: passes over a batch, and optimizer steps per pass.
        micro_batch_size, micro_batch_tokens: the most rows, and tokens encoded, of one
            micro-batch.
        max_tokens: the generation budget (Dr. GRPO's normaliser).
        temperature: the sampling temperature the log-probs are taken at.
        attention: the packed attention's backend (``reference`` or ``triton``).
        seed: the mini-batch shuffles' seed.
        ref_model: the frozen KL reference (``objective.kl_coef > 0``).
        mask_truncated: rows whose response hit the token budget train nothing (TRL's and
            DAPO's ``mask_truncated_completions``; their rewards still count in their groups).
        entropy_control: an adaptive entropy coefficient
            (:class:`~grpo_lab.training.coefficients.AdaptiveEntropy`) that replaces
            ``objective.entropy_coef`` at every update and observes its entropy.
    """

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: Objective
    packing: Packing
    pad_id: int
    device: torch.device
    epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 64
    micro_batch_tokens: int | None = None
    max_grad_norm: float = 1.0
    max_tokens: int = 16
    temperature: float = 1.0
    attention: str = "reference"
    seed: int = 0
    mixed_precision: str = "no"
    dist: DistContext = SINGLE
    ref_model: torch.nn.Module | None = None
    mask_truncated: bool = False
    entropy_control: Any = None
    _params: list = field(init=False, repr=False)  # the trainable parameters, for clipping

    def __post_init__(self) -> None:
        self._params = [p for p in self.module.parameters() if p.requires_grad]

    def autocast(self):
        return autocast(self.device, self.mixed_precision, self.dist.strategy)

    def __call__(self, batch: RolloutBatch, advantages: Tensor, extras: dict[str, Tensor] | None = None) -> dict[str, float]:
        """Optimizer steps on ``batch`` (``advantages`` ``[N]``, one per row; ``extras`` the
        estimator's further ``[N]`` streams, COPO's). Returns the step's metrics, reduced
        over ranks."""
        n = len(batch)
        adv = advantages.to(torch.float32)  # [N]
        if adv.shape != (n,):
            raise ValueError(f"this trainer takes one advantage per row ([{n}]), got shape {tuple(adv.shape)}")
        masked_rows = 0
        if self.mask_truncated and n:
            masked_rows = int(batch.truncated.sum())
            batch = batch.without_loss_on(batch.truncated)
        objective = self.objective
        if self.entropy_control is not None:
            objective = replace(objective, entropy_coef=float(self.entropy_control.value), every_row=True)
        single_pass = self.epochs * self.minibatches == 1
        old = None if single_pass else self.logprobs_no_grad(batch)  # N x [R_i]
        stats = RunningMeans()
        gen = torch.Generator().manual_seed(self.seed + (int(batch.group_id.min()) if n else 0))
        self.module.train()
        updates, lr = 0, float(self.optimizer.param_groups[0]["lr"])
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=gen)  # [N]
            chunks = list(order.chunk(self.minibatches))  # [N / minibatches] each
            chunks += [order[:0]] * (self.minibatches - len(chunks))  # fewer rows than mini-batches
            for rows in chunks:
                self.optimizer.zero_grad(set_to_none=True)
                metrics = policy_gradient_backward(
                    self.module, batch, rows, adv, old, objective, extras=extras, ref_model=self.ref_model,
                    packing=self.packing, attention=self.attention, micro_batch_size=self.micro_batch_size,
                    micro_batch_tokens=self.micro_batch_tokens, max_tokens=self.max_tokens,
                    temperature=self.temperature, pad_id=self.pad_id, dist=self.dist, autocast=self.autocast,
                )
                if metrics:  # else no rank has a row with a learning signal: no step (all ranks agree)
                    for key, (value, weight) in metrics.items():
                        # the ranks' loss shares are averaged over ranks below: scaled so they add up
                        stats.add(key, value * self.dist.world_size if key == "loss" else value, weight)
                    stats.add("grad_norm", clip_grad_norm(self._params, self.max_grad_norm))
                    lr = float(self.optimizer.param_groups[0]["lr"])
                    self.optimizer.step()
                    updates += 1
                with warnings.catch_warnings():  # the schedule counts optimizer steps, taken or skipped alike
                    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step",
                                            category=UserWarning)
                    self.scheduler.step()
        out = reduce_means(self.dist, stats.weighted())
        out["num_updates"] = updates
        out["lr"] = lr  # that of the last optimizer step taken
        if self.mask_truncated:
            out["truncated_rows_masked"] = masked_rows
        if self.entropy_control is not None:
            out["entropy_coef"] = objective.entropy_coef
            if "entropy" in out:  # the same on every rank (reduced above)
                self.entropy_control.observe(float(out["entropy"]))
        return out

    @torch.no_grad()
    def logprobs_no_grad(self, batch: RolloutBatch, module: torch.nn.Module | None = None) -> list[Tensor]:
        """The current policy's log-probs of every row (``N`` tensors ``[R_i]``), the
        denominator of the ratio over several passes, through the configured packing
        (``trainer.packing``); ``module``: another model's (the reference's). Ranks run
        equally many forwards."""
        module = self.module if module is None else module
        module.eval()
        # [m_k] each
        micros = split_micro_batches(batch, torch.arange(len(batch)), self.micro_batch_size, self.micro_batch_tokens,
                                     self.packing)
        out: list[Tensor] = []
        for k in range(lockstep_count(self.dist, len(micros))):
            with self.autocast():
                if k >= len(micros):
                    idle_forward(module, self.pad_id)
                    continue
                idx = micros[k].tolist()
                prompts, responses = [batch.prompt_ids[i] for i in idx], [batch.response_ids[i] for i in idx]
                logp, _, _ = self.packing.logprobs(module, prompts, responses, micro_groups(batch, idx),
                                                   temperature=self.temperature, pad_id=self.pad_id,
                                                   attention=self.attention)  # [m, R]
            out.extend(logp[j, : batch.response_ids[i].numel()].float().cpu() for j, i in enumerate(idx))  # [R_i] each
        return out
