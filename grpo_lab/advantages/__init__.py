"""Advantage estimators (``grpo_lab.advantages``): registries of pure functions.

    from grpo_lab.advantages import compute_advantages
    out = compute_advantages(batch, "gigpo", params={"gamma": 0.95}, modifiers={"focal": {"gamma": 1.0}})

Estimators turn rows into advantages; modifiers (``focal``) rescale any estimator's
output and run after it, in the order given. ``python -m grpo_lab.advantages --list``
prints both registries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..data import RolloutBatch, anchor_ids
from . import focal as _focal  # noqa: F401  (each import registers its functions)
from . import copo as _copo  # noqa: F401
from . import gigpo as _gigpo  # noqa: F401
from . import gpg as _gpg  # noqa: F401
from . import grpo as _grpo  # noqa: F401
from . import mgrpo as _mgrpo  # noqa: F401
from . import opo as _opo  # noqa: F401
from . import passk as _passk  # noqa: F401
from . import reinforce_pp as _reinforce_pp  # noqa: F401
from . import remax as _remax  # noqa: F401
from . import rloo as _rloo  # noqa: F401
from . import tree_grpo as _tree_grpo  # noqa: F401
from . import treerpo as _treerpo  # noqa: F401
from .registry import (
    AdvantageInputs,
    AdvantageOutput,
    Estimator,
    Modifier,
    Registered,
    get_estimator,
    get_modifier,
    keyword_parameters,
    list_estimators,
    list_modifiers,
    register_estimator,
    register_modifier,
)
from .shaping import PENALTY_PLACEMENTS, default_penalty_placement, invalid_action_penalty, row_penalties


def inputs_from_batch(batch: RolloutBatch, invalid_penalty: float = 0.0, penalty_placement: str = "row") -> AdvantageInputs:
    """The estimator's view of a batch, with the invalid-action penalty placed as
    ``penalty_placement`` says (:mod:`grpo_lab.advantages.shaping`): ``"row"`` passes it
    as each row's own ``penalty``, ``"episode"`` subtracts it from the step rewards."""
    if penalty_placement not in PENALTY_PLACEMENTS:
        raise ValueError(f"penalty placement must be one of {list(PENALTY_PLACEMENTS)}, got {penalty_placement!r}")
    row = penalty_placement == "row" and invalid_penalty != 0
    shaped = batch.reward + batch.reward_shaping  # [N] the environment's reward and the algorithm's additions
    rewards = shaped if row else invalid_action_penalty(shaped, batch.valid_action, invalid_penalty)
    return AdvantageInputs(
        rewards=rewards,
        penalty=row_penalties(batch.valid_action, invalid_penalty) if row else None,
        group_id=batch.group_id,
        traj_id=batch.traj_id,
        step=batch.step,
        anchor_id=anchor_ids(batch.anchor),
        anchors=batch.anchor,
        success=batch.won,
        tree_id=batch.tree_id,
        node_id=batch.node_id,
        parent_id=batch.parent_id,
        lengths=torch.stack([m.sum() for m in batch.loss_mask]) if len(batch) else torch.zeros(0),
        baseline_only=batch.baseline_only,
        role=batch.role,
        invocation=batch.invocation,
    )


@dataclass(frozen=True)
class AdvantagePipeline:
    """An estimator and its modifiers with every name resolved (``AlgoConfig.advantages()``),
    and where the invalid-action penalty goes. Called on a batch, it runs the estimator,
    then each modifier in order; modifiers rescale ``advantages``, extra streams
    (``extras``) pass through unchanged."""

    estimator: Registered
    params: Mapping[str, Any] = field(default_factory=dict)
    modifiers: tuple[tuple[Registered, Mapping[str, Any]], ...] = ()
    invalid_penalty: float = 0.0
    penalty_placement: str = "row"  # row | episode (:mod:`grpo_lab.advantages.shaping`)

    @classmethod
    def of(cls, name: str, params: Mapping[str, Any] | None = None,
           modifiers: Mapping[str, Mapping[str, Any]] | None = None, invalid_penalty: float = 0.0,
           penalty_placement: str | None = None) -> "AdvantagePipeline":
        """Estimator ``name`` and ``modifiers`` (``{name: params}``) looked up (an unknown
        name raises ``KeyError`` listing the valid ones); ``penalty_placement=None``: the
        estimator's default (:func:`~grpo_lab.advantages.shaping.default_penalty_placement`)."""
        return cls(get_estimator(name), dict(params or {}),
                   tuple((get_modifier(m), dict(p or {})) for m, p in (modifiers or {}).items()), invalid_penalty,
                   penalty_placement or default_penalty_placement(name))

    def run(self, inputs: AdvantageInputs) -> AdvantageOutput:
        out = self.estimator(inputs, **dict(self.params))
        metrics, advantages = dict(out.metrics), out.advantages  # [N]
        for modifier, params in self.modifiers:
            mod_out = modifier(advantages, inputs, **dict(params))
            advantages = mod_out.advantages  # [N]
            metrics.update(mod_out.metrics)
        return AdvantageOutput(advantages, metrics, out.extras)

    def __call__(self, batch: RolloutBatch) -> AdvantageOutput:
        """The advantages of ``batch``'s rows, each times its ``advantage_scale`` (R³'s
        ``alpha`` on replayed episodes; the extra streams are not scaled)."""
        out = self.run(inputs_from_batch(batch, self.invalid_penalty, self.penalty_placement))
        if len(batch) and bool((batch.advantage_scale != 1).any()):
            scale = batch.advantage_scale.to(out.advantages.dtype)  # [N]
            out = AdvantageOutput(out.advantages * (scale if out.advantages.dim() == 1 else scale[:, None]),
                                  out.metrics, out.extras)
        return out


def run_estimator(
    inputs: AdvantageInputs,
    name: str,
    params: Mapping[str, Any] | None = None,
    modifiers: Mapping[str, Mapping[str, Any]] | None = None,
) -> AdvantageOutput:
    """Estimator ``name`` with ``params``, then each modifier with its parameters, in order
    (:class:`AdvantagePipeline`)."""
    return AdvantagePipeline.of(name, params, modifiers).run(inputs)


def compute_advantages(
    batch: RolloutBatch,
    name: str,
    invalid_penalty: float = 0.0,
    params: Mapping[str, Any] | None = None,
    modifiers: Mapping[str, Mapping[str, Any]] | None = None,
    penalty_placement: str | None = None,
) -> AdvantageOutput:
    """Run estimator ``name`` (and ``modifiers``) on ``batch``, with the invalid-action
    penalty placed as ``penalty_placement`` says (``"row"`` or ``"episode"``; ``None``:
    the estimator's default, :func:`~grpo_lab.advantages.shaping.default_penalty_placement`)."""
    return AdvantagePipeline.of(name, params, modifiers, invalid_penalty, penalty_placement)(batch)


def example_inputs() -> AdvantageInputs:
    """A small valid input (2 groups x 2 episodes of 2 steps) to check hyper-parameters on."""
    return AdvantageInputs(
        rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]),
        group_id=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
        traj_id=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
        step=torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]),
        anchor_id=torch.tensor([0, 1, 0, 2, 3, 4, 3, 4]),
        anchors=["a", "b", "a", "c", "d", "e", "d", "e"],
        success=torch.tensor([False, True, False, False, False, True, False, True]),
        lengths=torch.tensor([3.0, 2.0, 4.0, 1.0, 2.0, 2.0, 5.0, 1.0]),
    )


__all__ = [
    "AdvantageInputs",
    "AdvantagePipeline",
    "AdvantageOutput",
    "Estimator",
    "Modifier",
    "compute_advantages",
    "example_inputs",
    "get_estimator",
    "get_modifier",
    "inputs_from_batch",
    "PENALTY_PLACEMENTS",
    "default_penalty_placement",
    "invalid_action_penalty",
    "row_penalties",
    "keyword_parameters",
    "list_estimators",
    "list_modifiers",
    "register_estimator",
    "register_modifier",
    "run_estimator",
]
