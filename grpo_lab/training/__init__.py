"""Training (``grpo_lab.training``): packings and the training forward, one mini-batch's
gradient (per micro-batch: forward, loss, backward), the update phase, distributed
plumbing, checkpoint files, how a run starts in its directory, stop signals, warm-up."""

from .forward import response_logprobs

__all__ = ["response_logprobs"]
