"""Shared-prefix training forward (Prefix Grouper).

Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward".
The G responses of a group share their prompt; the ordinary forward encodes that prompt
G times. Here each group is packed as one row ``[P; S1; ...; SG]`` so the prefix ``P`` is
encoded once:

- positions restart at ``len(P)`` for every member, so each member sees exactly the
  positions of its ordinary row;
- in every attention layer, prefix queries attend causally inside ``P``, and each
  member's queries attend to all of ``P`` and causally to their own earlier tokens,
  never to another member.

Outputs and gradients equal those of the ordinary forward on the G rows (up to
floating-point summation order); ``tests/test_shared_prefix.py`` checks it.

Departure stated: the paper packs identical prompts. Here ``P`` is the *longest common
prefix* of the group's prompts, and each member segment ``S_i`` is the rest of its
prompt followed by its response, so multi-turn rows whose prompts share the task text
and early history share that part too. A group whose prompts share nothing, or a group
of one, goes through the ordinary forward.

The attention plugs into Hugging Face models through ``transformers``' attention
registry (``AttentionInterface``) under the name ``"grpo_shared_prefix"``: no modelling
code is copied, and any model family whose attention goes through that registry and
whose decoder layers pass the call's keyword arguments on to it works
(``tests/test_shared_prefix_families.py`` runs a list of families). Without a packed
layout in the call, the registered function is the model's ordinary attention (SDPA, or
masked attention with the logit soft-cap where the model has one), so the model behaves
as usual elsewhere. This module's attention is the PyTorch reference (one SDPA call for
the prefix and one for all members of a row); the Triton kernel plugs in at the same point.

A packed forward proves that it took the packed path: every attention layer must receive
the layout (counted during the forward), else it raises naming the model type, and
nothing is returned (StableLM's decoder layers, for one, drop the keyword arguments, so
its members would attend to each other). Attention logit soft-capping (Gemma2) is applied
in every path; sliding-window layers are accepted when every packed row is no longer
than the window (the window then masks nothing), and refused with the lengths otherwise.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.attention import masked_attention, repeat_kv
from ..kernels.layouts import RowLayout, TrieLayout
from ..kernels.packed import BACKENDS as ATTENTION_BACKENDS
from ..kernels.packed import packed_attention
from ..modeling import text_config
from .forward import pad_rows, response_logprobs, token_logprobs

ATTENTION_NAME = "grpo_shared_prefix"
LAYOUT_KWARG = "shared_prefix_layout"


# ----------------------------------------------------------------------------- attention
@dataclass
class _Receipt:
    """What the attention layers saw during one packed forward."""

    modules: set[int] = field(default_factory=set)  # attention modules that received the layout
    missed: int = 0  # attention calls without it


_RECEIPT: contextvars.ContextVar[_Receipt | None] = contextvars.ContextVar("grpo_shared_prefix_receipt", default=None)

#: attention keyword arguments that change the function and that no path here implements
_UNSUPPORTED = ("s_aux", "sinks", "position_bias")


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered as ``"grpo_shared_prefix"`` in ``transformers``.

    With ``shared_prefix_layout`` among the model call's keyword arguments it computes
    packed attention (the mask argument is ignored: the layout defines it): of packed
    groups for :class:`RowLayout` rows, of a packed trie for a
    :class:`~grpo_lab.kernels.layouts.TrieLayout`; without, it is
    the model's ordinary attention: ``transformers``' SDPA, or :func:`masked_attention`
    when the layer soft-caps its logits.
    """
    layout = kwargs.pop(LAYOUT_KWARG, None)
    backend = kwargs.pop("shared_prefix_backend", "reference")
    softcap = kwargs.pop("softcap", None)
    receipt = _RECEIPT.get()
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"grpo_lab's attention does not implement {name!r} ({type(module).__name__}): "
                                      "use another attention implementation for this model")
    if layout is None:
        if receipt is not None:
            receipt.missed += 1
        if softcap is not None:
            if dropout and module.training:
                raise NotImplementedError("soft-capped attention with dropout is not implemented")
            groups = query.shape[1] // key.shape[1]
            mask = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask > -1
            out = masked_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), mask, scaling, softcap)
            return out.transpose(1, 2).contiguous(), None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if receipt is not None:
        receipt.modules.add(id(module))
    trie = isinstance(layout, TrieLayout)
    query = undo_packed_query_scaling(module, query, layout)
    window, chunk = kwargs.get("sliding_window"), chunk_size(module)
    exact_by_depth = trie and backend == "reference"  # the trie reference applies both masks by depth
    longest = layout.max_depth if trie else max((row.prefix_len + max(row.member_lens, default=0) for row in layout),
                                                default=0)
    for name, limit in (("sliding window", window), ("attention_chunk_size", chunk)):
        if limit is not None and longest > limit and not exact_by_depth:
            raise NotImplementedError(
                f"shared-prefix attention: a packed row's prompt plus response is {longest} tokens, longer than this "
                f"layer's {name} of {limit}, which the {'Triton kernel' if backend == 'triton' else 'group packing'} "
                "does not apply; use trainer.packing=trie (or auto) with trainer.attention=sdpa_shared_prefix, "
                "trainer.packing=none, or shorter episodes")
    if dropout and module.training:
        raise NotImplementedError("shared-prefix attention does not support attention dropout")
    return packed_attention(query, key, value, layout, backend, scaling, softcap, window, chunk), None


def token_depths(layout, length: int, device: torch.device) -> Tensor:
    """``[B, L]``: the position id of every packed token (its depth), for a
    :class:`~grpo_lab.kernels.layouts.TrieLayout` (``B = 1``) or :class:`RowLayout` rows
    (padding continues the count)."""
    if isinstance(layout, TrieLayout):
        depth = layout.token_depth()
        rows = [torch.cat([depth, torch.arange(depth.numel(), length)])]
    else:
        rows = []
        for row in layout:
            parts = [torch.arange(row.prefix_len)]
            parts += [torch.arange(row.prefix_len, row.prefix_len + n) for n in row.member_lens]
            parts.append(torch.arange(row.length, length))
            rows.append(torch.cat(parts))
    return torch.stack(rows).to(device)


def chunk_size(module) -> int | None:
    """The chunk of a chunked-attention layer (Llama-4's RoPE layers:
    ``layer_types[i] == "chunked_attention"``, ``attention_chunk_size``), else ``None``."""
    config, index = getattr(module, "config", None), getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    if types is None or index is None or index >= len(types) or types[index] != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)


def undo_packed_query_scaling(module, query: Tensor, layout) -> Tensor:
    """``query`` as the layer would have scaled it by the tokens' depths, where the layer
    scaled it by their index in the packed row instead.

    Llama-4's NoPE layers (``attn_temperature_tuning``, Nakanishi 2025's attention
    temperature) multiply each query by ``log1p(floor((t + 1) / floor_scale)) *
    attn_scale + 1`` with ``t`` counted from 0 along the sequence given, not taken from
    the position ids; packed, ``t`` runs over the whole packed row. The factor is never
    0, so the query is divided by the packed-index factor and multiplied by the depth's
    (exact up to rounding). Other layers pass unchanged."""
    if not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return query
    floor_scale, attn_scale = float(module.floor_scale), float(module.attn_scale)
    if query.shape[2] < floor_scale:  # every factor is 1 below floor_scale
        return query

    def factor(t: Tensor) -> Tensor:
        return torch.log1p(torch.floor((t.float() + 1.0) / floor_scale)) * attn_scale + 1.0

    packed = torch.arange(query.shape[2], device=query.device)
    depths = token_depths(layout, query.shape[2], query.device)  # [B, L]
    compute = torch.promote_types(query.dtype, torch.float32)  # the factors as the layer computed them (float32)
    fix = factor(depths).to(compute) / factor(packed).to(compute)[None, :]  # [B, L]
    return query * fix[:, None, :, None].to(query.dtype)


def model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def _attention_layers(model: torch.nn.Module) -> int | None:
    """The number of attention layers a forward must reach: the decoder's
    ``num_hidden_layers`` (of the text config for multimodal models)."""
    n = getattr(text_config(model), "num_hidden_layers", None) if hasattr(model, "config") else None
    return int(n) if n is not None else None


def _check_receipt(model: torch.nn.Module, receipt: _Receipt) -> None:
    """Raise unless every attention layer of the packed forward got the layout."""
    expected = _attention_layers(model)
    reached = len(receipt.modules)
    if receipt.missed or reached == 0 or (expected is not None and reached != expected):
        raise NotImplementedError(
            f"the shared-prefix forward did not reach every attention layer of this {model_type(model)!r} model "
            f"({reached} of {expected if expected is not None else '?'} layers got the packed layout, {receipt.missed} "
            "attention calls came without it: its decoder layers do not pass the attention keyword arguments through), "
            "so its numbers would be wrong; use trainer.packing=none for this model")


def check_attention_backend(name: str) -> None:
    """Raise ``RuntimeError`` saying what is missing when ``name`` cannot run here."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown shared-prefix attention backend {name!r}; valid: {list(ATTENTION_BACKENDS)}")
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise RuntimeError("the Triton shared-prefix attention needs triton: pip install triton") from None
        import os

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton shared-prefix attention needs a CUDA GPU (or TRITON_INTERPRET=1 for testing)")


_RECURRENT_NAMES = ("Mamba", "Rwkv", "RWKV", "LinearAttention", "GatedDeltaNet", "DeltaNet", "ShortConv", "StateSpace")


def packing_obstacles(model: torch.nn.Module) -> list[str]:
    """Why packing groups into one row would give wrong numbers for ``model`` (empty when
    nothing is known against it): attention that does not go through ``transformers``'
    registry, or layers that mix tokens outside attention (state-space, recurrent and
    convolutional mixers carry a member's tokens into the next member of the row)."""
    found = []
    if not getattr(model, "_supports_attention_backend", True):
        found.append(f"{type(model).__name__} does not route its attention through transformers' AttentionInterface")
    for name, module in model.named_modules():
        cls = type(module).__name__
        temporal_conv = isinstance(module, torch.nn.Conv1d) and module.kernel_size[0] > 1
        if temporal_conv or any(part in cls for part in _RECURRENT_NAMES):
            found.append(f"{name or 'the model'} ({cls}) mixes tokens outside attention")
            break
    return found


def enable_shared_prefix(model: torch.nn.Module) -> torch.nn.Module:
    """Register the attention (once) and switch ``model`` to it. The model still runs
    ordinary forwards as SDPA, with the usual masks. Raises ``NotImplementedError``
    naming the model type when packing cannot be exact for it (:func:`packing_obstacles`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    obstacles = packing_obstacles(model)
    if obstacles:
        raise NotImplementedError(
            f"the shared-prefix forward cannot be exact for this {model_type(model)!r} model: {'; '.join(obstacles)}. "
            "Use trainer.packing=none for it")

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
    return model


# ----------------------------------------------------------------------------- packing
def common_prefix_length(rows: Sequence[Tensor]) -> int:
    """Length of the longest common prefix of one-dimensional token tensors."""
    shortest = min(r.numel() for r in rows)
    first = rows[0][:shortest]
    same = torch.ones(shortest, dtype=torch.bool)
    for r in rows[1:]:
        same &= r[:shortest] == first
    mismatch = torch.nonzero(~same)
    return int(mismatch[0]) if mismatch.numel() else shortest


def groups_by_prompt(prompt_ids: Sequence[Tensor]) -> list[list[int]]:
    """Rows with identical prompts, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(tuple(p.tolist()), []).append(i)
    return list(groups.values())


def packed_forward(model: torch.nn.Module, input_ids: Tensor, position_ids: Tensor, layout, attention: str) -> Tensor:
    """The logits of packed rows (``layout``: :class:`RowLayout` rows, or a
    :class:`~grpo_lab.kernels.layouts.TrieLayout`), with the proof that every attention
    layer took the packed path (:func:`_check_receipt`)."""
    receipt = _Receipt()
    token = _RECEIPT.set(receipt)
    try:
        logits = model(input_ids=input_ids, position_ids=position_ids,
                       **{LAYOUT_KWARG: layout, "shared_prefix_backend": attention}).logits
    finally:
        _RECEIPT.reset(token)
    _check_receipt(model, receipt)
    return logits


def shared_prefix_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Tensor],
    response_ids: Sequence[Tensor],
    groups: Sequence[Sequence[int]] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    pad_id: int = 0,
    attention: str = "reference",
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`~grpo_lab.training.forward.response_logprobs` with each group's common prompt
    prefix encoded once. ``model`` must have gone through :func:`enable_shared_prefix`.

    Args:
        groups: lists of row indices to pack together (default: rows with identical
            prompts); every row must be in exactly one group.
        attention: ``"reference"`` (PyTorch SDPA) or ``"triton"`` (``grpo_lab.kernels``).

    Returns:
        as ``response_logprobs``: ``logprobs`` ``[N, R]``, ``mask`` ``[N, R]``,
        ``entropy`` ``[N, R]`` or None, in the rows' order.
    """
    n = len(prompt_ids)
    if len(response_ids) != n:
        raise ValueError(f"{n} prompts but {len(response_ids)} responses")
    groups = [list(g) for g in (groups if groups is not None else groups_by_prompt(prompt_ids))]
    covered = sorted(i for g in groups for i in g)
    if covered != list(range(n)):
        raise ValueError("groups must cover every row exactly once")
    if any(r.numel() == 0 for r in response_ids):
        raise ValueError("every response needs at least one token")
    device = next(model.parameters()).device
    width = max(r.numel() for r in response_ids)

    packed: list[tuple[list[int], int]] = []
    plain: list[int] = []
    for g in groups:
        p = common_prefix_length([prompt_ids[i] for i in g]) if len(g) > 1 else 0
        (packed.append((g, p)) if p > 0 else plain.extend(g))

    outputs: list[tuple[list[int], Tensor, Tensor | None]] = []
    if plain:
        lp, _, ent = response_logprobs(model, [prompt_ids[i] for i in plain], [response_ids[i] for i in plain],
                                       temperature=temperature, with_entropy=with_entropy, pad_id=pad_id,
                                       entropy_grad=entropy_grad)
        outputs.append((plain, lp, ent))
    if packed:
        seqs, layouts, positions, targets = [], [], [], []
        for g, p in packed:
            segments = [torch.cat([prompt_ids[i][p:], response_ids[i]]) for i in g]
            seqs.append(torch.cat([prompt_ids[g[0]][:p], *segments]))
            layouts.append(RowLayout(p, tuple(s.numel() for s in segments)))
            positions.append(torch.cat([torch.arange(p)] + [torch.arange(p, p + s.numel()) for s in segments]))
            # where each response token is predicted from: the previous packed position,
            # or the last prefix token for a member whose segment starts with the response
            start = p
            for i, s in zip(g, segments):
                first = start + s.numel() - response_ids[i].numel()
                pred = torch.arange(first - 1, first - 1 + response_ids[i].numel())
                if first == start:
                    pred[0] = p - 1
                targets.append((i, len(seqs) - 1, pred))
                start += s.numel()
        input_ids = pad_rows(seqs, pad_id, torch.long).to(device)
        position_ids = pad_rows(positions, 0, torch.long).to(device)
        logits = packed_forward(model, input_ids, position_ids, layouts, attention)
        rows = [i for i, _, _ in targets]
        pred = pad_rows([t for _, _, t in targets], 0, torch.long).to(device)  # [M, R]
        which = torch.tensor([b for _, b, _ in targets], device=device)
        flat = logits.reshape(-1, logits.shape[-1])  # index_select: a reproducible backward (see trie.py)
        picked = torch.index_select(flat, 0, (which[:, None] * logits.shape[1] + pred).flatten()).view(
            *pred.shape, logits.shape[-1])  # [M, R, V]
        tgt = pad_rows([response_ids[i] for i in rows], pad_id, torch.long).to(device)
        outputs.append((rows, *token_logprobs(picked, tgt, temperature, with_entropy, entropy_grad)))
    mask = pad_rows([torch.ones(r.numel()) for r in response_ids], 0.0).to(device)
    parts_lp, parts_ent, order = [], [], []
    for rows, lp, ent in outputs:
        order.extend(rows)
        parts_lp.append(F.pad(lp, (0, width - lp.shape[1])))
        if with_entropy:
            parts_ent.append(F.pad(ent, (0, width - ent.shape[1])))
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(n)
    inverse = inverse.to(device)
    logprobs = torch.cat(parts_lp)[inverse] * mask
    entropy = torch.cat(parts_ent)[inverse] * mask if with_entropy else None
    return logprobs, mask, entropy
