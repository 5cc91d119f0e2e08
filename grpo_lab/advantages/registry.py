"""The estimator and modifier registries: pure functions registered by name with a decorator.

An estimator takes an :class:`AdvantageInputs` and keyword hyper-parameters and returns
an :class:`AdvantageOutput`. It knows nothing of models, tokenizers or environments.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import Tensor

from ..registry import Registry


@dataclass(frozen=True)
class AdvantageInputs:
    """The columns an estimator may read, one entry per row (``N`` rows).

    - ``rewards`` ``[N]`` float: per-step rewards (shaped by the algorithm if it wants).
    - ``group_id`` ``[N]`` long: rows of episodes that started from the same task and seed.
    - ``traj_id`` ``[N]`` long: the episode a row belongs to.
    - ``step`` ``[N]`` long: turn index inside the episode.
    - ``anchor_id`` ``[N]`` long or None: equal ids iff equal environment states.
    - ``anchors``: the ``N`` anchors themselves, for estimators that compare them.
    - ``success`` ``[N]`` bool or None: the episode was won at this row.
    - ``tree_id``, ``node_id``, ``parent_id`` ``[N]`` long or None: tree sampling
      bookkeeping (see ``grpo_lab.advantages.trees``); -1 everywhere means chains.
    - ``lengths`` ``[N]`` float or None: the tokens each row trains (its sampled tokens);
      the estimators that weigh by length (OPO, REINFORCE++'s whitening) read it.
    - ``role``, ``invocation`` ``[N]`` long or None: a multi-agent episode's acting role
      (0 the main agent) and a sub-agent row's invocation index (-1 on main rows); M-GRPO
      reads them.
    - ``baseline_only`` ``[N]`` bool or None: the row's episode is its group's baseline
      (ReMax's greedy episode), scored and not trained; only ReMax reads it.
    - ``penalty`` ``[N]`` float >= 0 or None: a penalty each row pays on its own scores
      (``algo.penalty_placement=row``, see :mod:`grpo_lab.advantages.shaping`): an
      estimator subtracts it from that row's episode score and step return, and from
      nothing else. ``None`` is no penalty (or one already folded into ``rewards``).
    """

    rewards: Tensor
    group_id: Tensor
    traj_id: Tensor
    step: Tensor | None = None
    anchor_id: Tensor | None = None
    anchors: Sequence[Hashable] | None = None
    success: Tensor | None = None
    tree_id: Tensor | None = None
    node_id: Tensor | None = None
    parent_id: Tensor | None = None
    penalty: Tensor | None = None
    lengths: Tensor | None = None
    baseline_only: Tensor | None = None
    role: Tensor | None = None
    invocation: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.rewards.shape[0] if self.rewards.dim() == 1 else -1
        if n < 0:
            raise ValueError(f"rewards must be one-dimensional [N], got shape {tuple(self.rewards.shape)}")
        if self.anchors is not None and len(self.anchors) != n:
            raise ValueError(f"anchors has {len(self.anchors)} rows, expected {n} like rewards")
        for name in ("group_id", "traj_id", "step", "anchor_id", "success", "tree_id", "node_id", "parent_id", "penalty",
                     "lengths", "baseline_only", "role", "invocation"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected ({n},) like rewards")
        if not torch.isfinite(self.rewards).all():
            bad = torch.nonzero(~torch.isfinite(self.rewards)).flatten().tolist()[:5]
            raise ValueError(f"rewards must be finite; non-finite values at rows {bad}")
        if self.penalty is not None and not bool(((self.penalty >= 0) & torch.isfinite(self.penalty)).all()):
            bad = torch.nonzero(~((self.penalty >= 0) & torch.isfinite(self.penalty))).flatten().tolist()[:5]
            raise ValueError(f"penalty must be finite and >= 0; bad values at rows {bad}")

    def no_row_penalty(self, estimator: str) -> None:
        """Refuse a row penalty (the estimators whose scores are whole episodes' returns
        take the penalty in the rewards: ``algo.penalty_placement=episode``)."""
        if self.penalty is not None:
            raise ValueError(f"{estimator} takes the invalid-action penalty in the rewards: set "
                             "algo.penalty_placement=episode (it has no per-row score a row penalty could lower)")

    def row_lengths(self) -> Tensor:
        """``[N]`` float64: each row's trained tokens (ones without ``lengths``)."""
        if self.lengths is None:
            return torch.ones(self.rewards.shape[0], dtype=torch.float64)
        return self.lengths.to(torch.float64)

    def row_penalty(self) -> Tensor:
        """``[N]`` float64: each row's own penalty (zeros without one)."""
        if self.penalty is None:
            return torch.zeros(self.rewards.shape[0], dtype=torch.float64)
        return self.penalty.to(torch.float64)


@dataclass
class AdvantageOutput:
    """``advantages`` ``[N]`` (one value per row, broadcast over its tokens) or ``[N, T]``;
    ``metrics``: detached scalars for logging; ``extras``: further ``[N]`` streams the loss
    understands (``global_advantages`` and ``local_weight``, see ``copo``)."""

    advantages: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def no_rows(cls) -> "AdvantageOutput":
        """The output for a batch without rows."""
        return cls(torch.zeros(0), {"frac_zero_std_groups": 0.0})


EstimatorFn = Callable[..., AdvantageOutput]


def keyword_parameters(fn: Callable[..., Any]) -> list[str]:
    """The hyper-parameter names of an estimator or modifier (its keyword-only arguments)."""
    return sorted(k for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _check_params(name: str, fn: Callable[..., Any], params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(keyword_parameters(fn)))
    if unknown:
        raise TypeError(f"{name!r} got unknown parameters {unknown}; it accepts {keyword_parameters(fn)}")


@dataclass(frozen=True)
class Registered:
    """A registered estimator or modifier: calling it checks the hyper-parameter names."""

    name: str
    fn: Callable[..., AdvantageOutput]
    description: str

    def __call__(self, *args: Any, **params: Any) -> AdvantageOutput:
        _check_params(self.name, self.fn, params)
        return self.fn(*args, **params)


Estimator = Modifier = Registered

#: ``fn(inputs, **params) -> AdvantageOutput``, by ``algo.estimator``
ESTIMATORS: Registry[EstimatorFn] = Registry("estimators", "algo.estimator", "advantage estimator")
#: ``fn(advantages, inputs, **params) -> AdvantageOutput``, by ``algo.modifiers``
MODIFIERS: Registry[EstimatorFn] = Registry("modifiers", "algo.modifiers", "advantage modifier")


def register_estimator(name: str) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn(inputs, **params)`` as estimator ``name``; the first line of its
    docstring describes it. Raises ``ValueError`` if ``name`` is taken."""
    return ESTIMATORS.register(name)


def _registered(registry: Registry, name: str) -> Registered:
    entry = registry.entry(name)
    return Registered(name=name, fn=entry.target, description=entry.description)


def get_estimator(name: str) -> Registered:
    """The estimator registered as ``name``; ``KeyError`` listing the valid names otherwise."""
    return _registered(ESTIMATORS, name)


def list_estimators() -> dict[str, str]:
    """Registered names and their one-line descriptions."""
    return ESTIMATORS.descriptions()


def register_modifier(name: str) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn(advantages, inputs, **params)`` as modifier ``name``: it rescales the
    advantages of any estimator and runs after it. A taken name raises."""
    return MODIFIERS.register(name)


def get_modifier(name: str) -> Registered:
    """The modifier registered as ``name``; ``KeyError`` listing the valid names otherwise."""
    return _registered(MODIFIERS, name)


def list_modifiers() -> dict[str, str]:
    """Registered modifier names and their one-line descriptions."""
    return MODIFIERS.descriptions()
