"""Weights from the trainer to engines in other processes over ``torch.distributed``.

The trainer (rank 0) and the engines (ranks 1..N) form a gloo process group of their own
(:func:`weight_group`, through a TCP store the trainer hosts), apart from any default
group the trainer has (its DDP). A push is a stream: each tensor broadcast after a small
header (kind, dtype, shape, name length) and its name, then an end mark, so that no side
holds more than one tensor beyond its model (:func:`send_tensors`, :func:`receive_tensors`).
A LoRA adapter's config travels as JSON beside its tensors (:func:`adapter_config_dict`).
"""

from __future__ import annotations

import datetime
import socket
from typing import Iterable, Iterator

import torch
from torch import Tensor

#: the dtypes a push carries, by code (every tensor travels as its bytes)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)
HEADER = 16  # int64 slots: kind, dtype code, ndim, name length, then up to 12 dims
END, TENSOR = 0, 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def address_toward(url: str) -> str:
    """This machine's address on the route to ``url``'s host (where an engine there can
    reach this process): ``GRPO_LAB_WEIGHT_HOST`` when set."""
    import os
    from urllib.parse import urlsplit

    if os.environ.get("GRPO_LAB_WEIGHT_HOST"):
        return os.environ["GRPO_LAB_WEIGHT_HOST"]
    host = urlsplit(url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent: the route is looked up
        probe.connect((host, 9))
        return probe.getsockname()[0]


def adapter_config_dict(peft_config) -> dict:
    """A ``LoraConfig`` as JSON (what :func:`adapter_config` rebuilds)."""
    def plain(value):
        if isinstance(value, (set, frozenset, tuple)):
            return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        return getattr(value, "value", value)  # enums (peft_type, task_type) by value

    return {key: plain(value) for key, value in peft_config.to_dict().items()}


def adapter_config(data: dict):
    """The ``LoraConfig`` of :func:`adapter_config_dict`'s ``data``."""
    import dataclasses

    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return LoraConfig(**{key: value for key, value in data.items() if key in names and key != "peft_type"})


def weight_group(host: str, port: int, rank: int, world: int, timeout_s: float = 300.0):
    """A gloo process group of ``world`` ranks through a TCP store at ``host:port`` (rank 0
    hosts it), apart from any default group this process has (the trainer's DDP)."""
    from torch.distributed import ProcessGroupGloo, TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    store = TCPStore(host, port, world, rank == 0, timeout=timeout)
    return ProcessGroupGloo(store, rank, world, timeout)


def _broadcast(group, tensor: Tensor) -> None:
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def send_tensors(group, named_tensors: Iterable[tuple[str, Tensor]]) -> int:
    """Rank 0: broadcast each tensor after its header, then the end mark; the count."""
    count = 0
    for name, tensor in named_tensors:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype not in DTYPES or tensor.dim() > HEADER - 4:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} with {tensor.dim()} dims cannot be pushed")
        encoded = name.encode()
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[:4] = torch.tensor([TENSOR, DTYPES.index(tensor.dtype), tensor.dim(), len(encoded)])
        header[4:4 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        _broadcast(group, header)
        _broadcast(group, torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
        _broadcast(group, tensor.reshape(-1).view(torch.uint8))
        count += 1
    _broadcast(group, torch.zeros(HEADER, dtype=torch.int64))  # kind END
    return count


def receive_tensors(group) -> Iterator[tuple[str, Tensor]]:
    """Ranks > 0: the tensors rank 0 sends, one at a time, until its end mark."""
    while True:
        header = torch.zeros(HEADER, dtype=torch.int64)
        _broadcast(group, header)
        kind, code, ndim, length = (int(x) for x in header[:4])
        if kind == END:
            return
        name = torch.zeros(length, dtype=torch.uint8)
        _broadcast(group, name)
        dtype, shape = DTYPES[code], [int(x) for x in header[4:4 + ndim]]
        data = torch.empty(shape, dtype=dtype)
        _broadcast(group, data.reshape(-1).view(torch.uint8))
        yield bytes(name.tolist()).decode(), data
