"""How a micro-batch's rows go through the model: the packings, one object each.

``trainer.packing`` names one, resolved once (:data:`PACKINGS`) into an object
whose :meth:`Packing.logprobs` every training forward calls (the policy's, the KL
reference's and the old log-probs'):

- ``none``: one right-padded row per (prompt, response) (:func:`~grpo_lab.training.forward.response_logprobs`);
- ``group``: each group's common prompt prefix once (Prefix Grouper, :mod:`~grpo_lab.training.shared_prefix`);
- ``trie``: every shared token prefix once (:mod:`~grpo_lab.training.trie`);
- ``auto`` (the default): per micro-batch, the trie or no packing, whichever the cost
  model (:func:`packing_costs`) says is cheaper.

Every packing gives the same log-probs and gradients (up to summation order), so the
choice changes speed and memory only; the choice of ``auto`` depends on the rows alone
(token ids and lengths, never a clock), so a run and its resume choose alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from ..modeling import text_config
from ..registry import Registry
from .forward import response_logprobs
from .shared_prefix import shared_prefix_logprobs
from .trie import sorted_rows, trie_logprobs


class Packing(Protocol):
    """A training forward: per-token log-probs of ``responses`` given ``prompts``."""

    name: str
    #: whether it encodes shared prefixes once: its model needs the packed attention, and
    #: rows should meet their prefix-sharing neighbours (sorted by group, trajectory, step)
    shares_prefixes: bool
    #: the packing a model is verified with before the run (:mod:`~grpo_lab.training.verify`)
    probe: "Packing"

    def logprobs(self, model: torch.nn.Module, prompts: Sequence[Tensor], responses: Sequence[Tensor],
                 groups: Sequence[Sequence[int]] | None = None, *, temperature: float = 1.0,
                 with_entropy: bool = False, pad_id: int = 0, attention: str = "reference",
                 entropy_grad: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """``logprobs`` ``[N, R]``, ``mask`` ``[N, R]`` and ``entropy`` ``[N, R]`` (or
        ``None``) as :func:`~grpo_lab.training.forward.response_logprobs` returns them;
        ``groups``: the rows of each group (for ``group``); ``attention``: the packed
        attention's backend (``reference`` or ``triton``)."""
        ...


@dataclass(frozen=True)
class FixedPacking:
    """One forward for every micro-batch: ``forward(model, prompts, responses, groups,
    attention, **options)``."""

    name: str
    shares_prefixes: bool
    forward: Callable[..., tuple[Tensor, Tensor, Tensor | None]]

    def logprobs(self, model, prompts, responses, groups=None, *, attention="reference", **options):
        return self.forward(model, prompts, responses, groups, attention, **options)

    @property
    def probe(self) -> "Packing":
        """The packing a model is verified with before the run (itself)."""
        return self


def _plain(model, prompts, responses, groups, attention, **options):
    return response_logprobs(model, prompts, responses, **options)


def _group(model, prompts, responses, groups, attention, **options):
    return shared_prefix_logprobs(model, prompts, responses, groups, attention=attention, **options)


def _trie(model, prompts, responses, groups, attention, **options):
    return trie_logprobs(model, prompts, responses, attention=attention, **options)


#: the trie is chosen when it costs at most this fraction of the plain forward, its
#: per-node overhead included (``benchmarks/trie.py --sweep`` measured where it starts to pay)
TRIE_AT_MOST = 0.9
#: what a trie node costs beyond its tokens, in token-equivalents: building the trie,
#: gathering its keys, reading its rows back (measured on the sweep's short prompts,
#: where a 26-token row costs about 1.2x its tokens alone)
NODE_COST = 4.0


def packing_costs(seqs: Sequence[Tensor], hidden_size: int) -> tuple[float, float]:
    """``(plain, trie)`` forward costs of rows ``seqs`` (prompt and response each), in
    token-equivalents: tokens encoded, plus query-key pairs of attention weighted by
    ``1 / (6 * hidden_size)`` (a pair costs ``4h`` FLOPs against ``24h^2`` per token in
    a decoder layer's projections), plus :data:`NODE_COST` per trie node.

    Plain: ``B`` rows padded to the longest, ``B * Lmax^2`` pairs (SDPA under a padding
    mask computes them all). Trie: each row, in sorted order, adds the tokens past its
    longest common prefix with the row before it (exactly the trie's tokens), each
    attending to its row's length (its depth, at most; the batched node attention pads
    little where nodes are alike, as a group's answers are); its nodes are a leaf per
    row and a branch node per new branch point (a common prefix unlike the previous
    row's)."""
    order, rows, lcp = sorted_rows(seqs)  # lcp: [B] with the row before, in sorted order
    lengths = np.array([len(rows[i]) for i in order], dtype=np.float64)  # [B]
    b, longest = len(rows), float(lengths.max())
    pair_cost = 1.0 / (6.0 * hidden_size)
    plain = b * longest + b * longest * longest * pair_cost
    added = lengths - lcp  # [B]
    nodes = b + int(((lcp[1:] > 0) & (lcp[1:] != lcp[:-1])).sum())  # leaves and branch points
    trie = float(added.sum()) + float((added * lengths).sum()) * pair_cost + NODE_COST * nodes
    return plain, trie


@dataclass(frozen=True)
class AutoPacking:
    """Per micro-batch, the trie when :func:`packing_costs` puts it at most
    :data:`TRIE_AT_MOST` of the plain forward, else no packing (short prompts and long
    answers, where the trie saves little)."""

    name: str = "auto"
    shares_prefixes: bool = True

    def choose(self, model: torch.nn.Module, prompts: Sequence[Tensor], responses: Sequence[Tensor]) -> "Packing":
        seqs = [torch.cat([p.cpu(), r.cpu()]) for p, r in zip(prompts, responses)]  # B x [P_i + R_i]
        while not hasattr(model, "config") and hasattr(model, "module"):  # DDP's wrapper
            model = model.module
        plain, trie = packing_costs(seqs, int(getattr(text_config(model), "hidden_size", 1024)))
        return PACKINGS["trie"] if trie <= TRIE_AT_MOST * plain else PACKINGS["none"]

    def logprobs(self, model, prompts, responses, groups=None, **kwargs):
        return self.choose(model, prompts, responses).logprobs(model, prompts, responses, groups, **kwargs)

    @property
    def probe(self) -> "Packing":
        """The packing a model is verified with: the trie, which it may choose."""
        return PACKINGS["trie"]


#: :class:`Packing` objects by ``trainer.packing``
PACKINGS: Registry[Packing] = Registry("packings", "trainer.packing", "packing", options=lambda packing: ())
PACKINGS.register("none", FixedPacking("none", False, _plain),
                  description="one right-padded row per (prompt, response): the plain forward")
PACKINGS.register("group", FixedPacking("group", True, _group),
                  description="each group's common prompt prefix once (Prefix Grouper)")
PACKINGS.register("trie", FixedPacking("trie", True, _trie),
                  description="every shared token prefix once (groups, conversation turns, tree branches)")
PACKINGS.register("auto", AutoPacking(),
                  description="per micro-batch the trie or none, whichever the cost model says is cheaper")
#: ``trainer.packing`` values of earlier versions
ALIASES = {"true": "group", "false": "none"}


def packing_name(value: bool | str) -> str:
    """``trainer.packing`` as one of :data:`PACKINGS`' names (``true`` is ``group``,
    ``false`` is ``none``); raises ``ValueError`` listing the valid ones."""
    text = str(value).lower()
    name = ALIASES.get(text, text)
    if name not in PACKINGS:
        raise ValueError(f"packing={value!r} is not one of {PACKINGS.names()} (or true / false)")
    return name


def get_packing(value: "bool | str | Packing") -> Packing:
    """The packing ``value`` names (a :class:`Packing` passes through)."""
    if not isinstance(value, (str, bool)):
        return value
    return PACKINGS[packing_name(value)]
