"""Training (``grpo_lab.training``): packings and the training forward, the update,
distributed plumbing, checkpoints, warm-up and the trainer's helpers."""

from .forward import response_logprobs

__all__ = ["response_logprobs"]
