"""Data-parallel plumbing: process groups, DDP and FSDP2 wrapping, and the reductions
that keep a multi-process step equal to the single-process one.

Launch with ``torchrun`` or ``accelerate launch``: both set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous variables, which :func:`init_distributed` reads. Each
rank plays its own slice of the step's tasks (whole groups, so every estimator stays
exact), computes advantages on its own groups, and takes part in one optimizer step whose
loss normalisers (token and sequence counts) are summed over all ranks
(:func:`global_sums`): the averaged gradient is then the gradient of the union of the
ranks' batches, for every ``algo.loss_agg``. Ranks also run the same number of forward
and backward passes (:func:`lockstep_count`), which FSDP's collectives need and which
keeps DDP's gradient synchronisation on the last micro-batch of every rank.

Departure from accelerate's ``Accelerator``: the collectives whose count and order must
match across ranks (micro-batches that skip rows without learning signal, weights
gathered into a rollout engine) are issued here, on PyTorch's DDP and ``fully_shard``
directly; accelerate's launcher and its config (``ACCELERATE_USE_FSDP``,
``ACCELERATE_MIXED_PRECISION``) are honoured.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger("grpo_lab")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run; ``world_size == 1`` is the single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous slice of ``items`` (``len(items)`` divisible by the world size)."""
        per = len(items) // self.world_size
        return list(items[self.rank * per:(self.rank + 1) * per])


SINGLE = DistContext()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(configured: str, world_size: int) -> str:
    """``trainer.strategy`` for this launch: ``none`` in one process; ``auto`` is ``fsdp``
    when accelerate's config asks for FSDP, else ``ddp``."""
    if world_size == 1:
        return "none"
    if configured == "auto":
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "ddp"
    return configured


def resolve_mixed_precision(configured: str) -> str:
    """``trainer.mixed_precision`` for this launch (``auto``: accelerate's config, else ``no``)."""
    if configured != "auto":
        return configured
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if value not in ("no", "bf16"):
        raise ValueError(f"the accelerate config's mixed_precision={value!r} is not supported: use bf16 (fp16 needs "
                         "loss scaling, which this trainer does not do) or no")
    return value


def narrow_visible_devices(environ: dict | None = None) -> str | None:
    """Under a launcher, let this process see only its own GPU (``LOCAL_RANK``'s entry of
    ``CUDA_VISIBLE_DEVICES``, or that index), so that everything on ``cuda:0`` (the
    trainer, and a vLLM engine, whose single-process executor always takes the first
    visible device) lands on the rank's GPU. Must run before CUDA is initialised; a list
    already narrowed to one device (SLURM's ``--gpus-per-task=1``) is kept. Returns the
    value set, or ``None`` when nothing changed."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1")) == 1 or "LOCAL_RANK" not in env:
        return None
    if torch.cuda.is_initialized():
        return None
    local = int(env["LOCAL_RANK"])
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if "CUDA_VISIBLE_DEVICES" in env and len(visible) <= 1:
        return None
    if visible and local >= len(visible):
        raise ValueError(f"LOCAL_RANK={local} but CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} lists "
                         f"{len(visible)} devices: start at most that many processes per node")
    env["CUDA_VISIBLE_DEVICES"] = visible[local] if visible else str(local)
    return env["CUDA_VISIBLE_DEVICES"]


def init_distributed(strategy: str, device: str) -> tuple[DistContext, torch.device | None]:
    """Join the launcher's process group (NCCL on CUDA, gloo on CPU) when ``WORLD_SIZE > 1``.

    Returns the context and, under a launcher, this rank's device (its GPU, see
    :func:`narrow_visible_devices`, or the CPU); ``None`` in a single process (the
    configured device applies)."""
    world = launched_world_size()
    if world == 1:
        return SINGLE, None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    index = local if use_cuda and torch.cuda.device_count() > 1 else 0  # one visible device: the rank's own
    if use_cuda:
        torch.cuda.set_device(index)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, strategy=resolve_strategy(strategy, world))
    return ctx, torch.device(f"cuda:{index}" if use_cuda else "cpu")


def shutdown(wait: bool = False) -> None:
    """Leave the process group; first the groups a vLLM engine in this process made on
    top of it (its exit handler would otherwise destroy them after the group is gone).

    ``wait``: first wait until every rank gets here (a run that ended on all ranks
    together). A rank that tore its group down while another still used it has died in
    gloo's threads ("terminate called without an active exception"). Not after an
    error, which the other ranks may never reach."""
    if not dist.is_initialized():
        return
    import sys

    if wait and dist.get_world_size() > 1:
        dist.barrier()

    state = sys.modules.get("vllm.distributed.parallel_state")
    if state is not None:  # vLLM's groups, then (by vLLM) the default one
        state.destroy_model_parallel()
        state.destroy_distributed_environment()
    if dist.is_initialized():
        dist.destroy_process_group()


def _device_for_collectives() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def global_sums(ctx: DistContext, values: Sequence[float]) -> list[float]:
    """``values`` summed over ranks (float64), unchanged in one process."""
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t)
    return t.cpu().tolist()


def lockstep_count(ctx: DistContext, count: int) -> int:
    """The largest ``count`` of any rank: every rank runs that many passes."""
    if not ctx.enabled:
        return count
    t = torch.tensor([count], dtype=torch.long, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(ctx: DistContext, flag: bool) -> bool:
    return lockstep_count(ctx, int(flag)) > 0


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def reduce_means(ctx: DistContext, metrics: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Weighted means over ranks of ``{name: (mean, weight)}`` (a name some rank lacks has
    weight 0 there)."""
    names = sorted(set().union(*gather_objects(ctx, sorted(metrics))))
    pairs = [metrics.get(n, (0.0, 0.0)) for n in names]
    sums = global_sums(ctx, [v * w for v, w in pairs] + [w for _, w in pairs])
    k = len(names)
    return {n: sums[i] / sums[k + i] for i, n in enumerate(names) if sums[k + i] > 0}


def broadcast_parameters(ctx: DistContext, model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (before sharding: FSDP does not)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (``_no_split_modules`` classes), the
    units FSDP shards and gathers one at a time."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_model(ctx: DistContext, model: torch.nn.Module, device: torch.device, mixed_precision: str = "no"
               ) -> torch.nn.Module:
    """The module the update runs through: ``model`` itself in one process, a
    ``DistributedDataParallel`` around it under ``ddp``; under ``fsdp`` the model is
    sharded in place (each decoder layer, then the root, holding the embeddings and the
    output layer, so that tied weights stay tied) and returned.

    With FSDP and ``mixed_precision=bf16``, the layers compute in bf16 and
    reduce gradients in float32 (``MixedPrecisionPolicy``); the weights stay float32."""
    if not ctx.enabled:
        return model
    broadcast_parameters(ctx, model)
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)  # buffers: rotary tables, equal everywhere
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if mixed_precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(f"trainer.strategy=fsdp: {type(model).__name__} names no decoder layer class "
                             "(_no_split_modules) to shard by")
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ValueError(f"unknown strategy {ctx.strategy!r}; valid: ddp, fsdp")


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward (``enabled``) or accumulate them
    locally (DDP's ``no_sync``; FSDP's ``set_requires_gradient_sync``)."""
    if hasattr(module, "no_sync") and not enabled:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    yield


def full_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``model.state_dict()`` items with every sharded tensor gathered, one at a time (so
    at most one full layer tensor is held beyond the shards); tied aliases included.
    Under FSDP every rank must consume the whole iterator, in the same order."""
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        yield name, full.detach()


def clip_grad_norm(parameters: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` that also takes FSDP's sharded gradients (the norm is the
    global one)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def autocast(device: torch.device, mixed_precision: str, strategy: str = "none"):
    """Autocast to bf16 for the forward under ``mixed_precision=bf16`` (not under FSDP,
    whose policy casts the layers' weights)."""
    if mixed_precision != "bf16" or strategy == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
