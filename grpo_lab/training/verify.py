"""Refusing a model the packed forward cannot be exact for, before the run trains it.

A probe of a few rows, long enough to reach every length-dependent behaviour of the
model's attention that the run can reach (sliding windows, Llama-4's chunks and NoPE
temperature), goes through the packing and through the plain forward; a model whose
layers do not all take the packed path, or whose log-probs differ, is refused with the
reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..modeling import text_config
from .forward import response_logprobs
from .packing import Packing, get_packing
from .shared_prefix import model_type


def length_thresholds(model: torch.nn.Module) -> tuple[list[int], list[int]]:
    """The lengths at which the model's attention starts to depend on position in a way
    packing must reproduce: ``(by row length, by packed length)``. By row: a sliding
    window (on the layers that use one) and Llama-4's chunk (``attention_chunk_size``);
    by packed length: Llama-4's NoPE temperature (``floor_scale``), which the layer
    counts along the packed sequence (:func:`undo_packed_query_scaling`)."""
    config = text_config(model)
    types = list(getattr(config, "layer_types", None) or [])
    rows, packed = [], []
    window = getattr(config, "sliding_window", None)
    if window and ("sliding_attention" in types or (not types and getattr(config, "use_sliding_window", True))):
        rows.append(window)
    if "chunked_attention" in types:
        rows.append(getattr(config, "attention_chunk_size", None))
    if getattr(config, "attn_temperature_tuning", False):
        packed.append(getattr(config, "floor_scale", None))

    def clean(values: list) -> list[int]:
        return sorted({int(t) for t in values if isinstance(t, int) and t > 0})

    return clean(rows), clean(packed)


def probe_rows(model: torch.nn.Module, max_row: int | None = None, max_packed: int | None = None
               ) -> tuple[list[Tensor], list[Tensor]]:
    """Prompts and responses for :func:`verify_shared_prefix`: two short rows sharing a
    9-token prompt, made long enough to cross every :func:`length_thresholds` the run can
    reach (``max_row``: its longest row; ``max_packed``: its longest packed sequence;
    ``None``: no bound): rows longer than the largest reachable row threshold, and
    together longer than the largest reachable packed one."""
    vocab = int(text_config(model).vocab_size)
    g = torch.Generator().manual_seed(0)
    by_row, by_packed = length_thresholds(model)
    row_t = [t for t in by_row if max_row is None or t < max_row]
    packed_t = [t for t in by_packed if max_packed is None or t < max_packed]
    if not row_t and not packed_t:
        prefix = torch.randint(0, vocab, (9,), generator=g)
        return [prefix, prefix], [torch.randint(0, vocab, (n,), generator=g) for n in (3, 5)]
    row = row_t[-1] + 8 if row_t else 16
    if max_row is not None:
        row = max(min(row, max_row), 4)
    total = max(packed_t[-1] + 8 if packed_t else 0, 2 * row)
    shared = min(9, row - 2)
    count = max(2, -(-(total - shared) // (row - shared)))  # together past the packed threshold
    prefix = torch.randint(0, vocab, (shared,), generator=g)
    return [prefix] * count, [torch.randint(0, vocab, (row - shared,), generator=g) for _ in range(count)]


def verify_shared_prefix(model: torch.nn.Module, attention: str = "reference", mode: "str | Packing" = "group",
                         max_row: int | None = None, max_packed: int | None = None) -> None:
    """One forward of the packing ``mode`` (a :class:`~grpo_lab.training.packing.Packing`
    or its name; ``auto`` is probed as the trie it may choose) of :func:`probe_rows`, beside
    the ordinary forward of the same rows, to refuse a model before training rather than
    at its first update: the probe reaches every length-dependent behaviour of the
    attention (:func:`length_thresholds`) the run can reach (``max_row``, ``max_packed``:
    its longest row and packed sequence). Raises ``NotImplementedError`` naming the model
    type when the packed path was not taken in every attention layer, when it refuses the
    probe's lengths (naming the setting), or (float32 and float64 models, where the
    comparison is meaningful) when the log-probs differ by more than 1e-3."""
    parameter = next(model.parameters())
    prompts, responses = probe_rows(model, max_row, max_packed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed, mask, _ = get_packing(mode).probe.logprobs(model, prompts, responses, [list(range(len(prompts)))],
                                                                attention=attention)
            plain, _, _ = response_logprobs(model, prompts, responses)
    finally:
        model.train(was_training)
    if parameter.dtype in (torch.float32, torch.float64):
        error = float(((packed - plain).abs() * mask).max())
        if not error <= 1e-3:
            longest = max(p.numel() + r.numel() for p, r in zip(prompts, responses))
            raise NotImplementedError(
                f"the shared-prefix forward of this {model_type(model)!r} model differs from its ordinary forward by "
                f"{error:.2e} in log-prob on a probe ({len(prompts)} rows of {longest} tokens): use "
                "trainer.packing=none for it")
