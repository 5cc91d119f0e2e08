"""Generation backends behind :class:`grpo_lab.rollout.backend.Backend`, by name.

``rollout.backend`` names a :class:`BackendSpec` of :data:`BACKENDS`: how to start the
engine from :class:`EngineSettings` (which the run builds from its config) and what the
run must know of it. Register another with ``BACKENDS.register(name, BackendSpec(...))``
or the entry-point group ``grpo_lab.backends``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ...registry import Registry, import_path
from .hf import HFBackend


@dataclass(frozen=True)
class EngineSettings:
    """What starting an engine takes: the policy (``model``, ``tokenizer``), the directory it
    can be loaded from (``source``: a hub name or a local path; ``None`` for a model that
    lives in memory only), and the engine's own settings."""

    model: Any
    tokenizer: Any
    source: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_batch_size: int = 64
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.5
    sleep_mode: bool = False
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    lora_rank: int | None = None
    request_seeds: bool = False
    console_level: str = "WARNING"


@dataclass(frozen=True)
class BackendSpec:
    """One backend: ``start(settings) -> Backend`` (or its import path
    ``"package.module:function"``, imported when the backend starts), whether it loads the
    policy from disk (``from_disk``: a model built in memory is saved for it first), and
    whether its own context length (``max_model_len``) bounds a prompt and its answer."""

    start_with: Callable[[EngineSettings], Any] | str
    description: str
    from_disk: bool = False
    own_context: bool = False

    def start(self, settings: EngineSettings):
        start = import_path(self.start_with) if isinstance(self.start_with, str) else self.start_with
        return start(settings)


def start_hf(settings: EngineSettings) -> HFBackend:
    """``model.generate`` on a copy of the policy, in this process."""
    return HFBackend(settings.model, settings.tokenizer, max_batch_size=settings.max_batch_size)


#: :class:`BackendSpec` objects by ``rollout.backend``
BACKENDS: Registry[BackendSpec] = Registry("backends", "rollout.backend", "rollout backend", options=lambda spec: (),
                                           describe=lambda spec: spec.description)
BACKENDS.register("hf", BackendSpec(start_hf, "transformers' generate on a copy of the policy, in this process"))
BACKENDS.register("vllm", BackendSpec("grpo_lab.rollout.backends.vllm:start_engine",
                                      "vLLM in this process, weights pushed in place after every update",
                                      from_disk=True, own_context=True))

__all__ = ["BACKENDS", "BackendSpec", "EngineSettings", "HFBackend", "start_hf"]
