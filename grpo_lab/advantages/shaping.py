"""Reward shaping applied before or inside an estimator: the invalid-action penalty.

An answer that does not parse, or names an illegal action, costs ``penalty`` (GiGPO's
reference implementation, verl-agent, uses 0.1). Where it lands is
``algo.penalty_placement``:

- ``"row"`` (default, except for Tree-GRPO; verl-agent's placement): each row pays its own penalty on its own
  scores only. The estimator subtracts it from that row's episode score (the episode's
  return, as every row of the episode sees it) and from that row's step return, so an
  invalid step lowers its own advantage and leaves the other steps of its episode alone.
  The estimators read it from ``AdvantageInputs.penalty``.
- ``"episode"``: the penalty is subtracted from the row's step reward before the
  estimator runs, so it enters the episode's return, which every step of the episode
  shares, and the discounted returns of the steps before it. An episode with k invalid
  steps has a return lower by ``k * penalty`` on every one of its rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

PENALTY_PLACEMENTS = ("row", "episode")
#: estimators that take the penalty in the rewards: a Tree-GRPO node's advantage is built
#: from the leaves below it, and there is no score of its own that a row penalty could lower;
#: the others score whole episodes (their returns) and nothing else
EPISODE_PLACEMENT_ESTIMATORS = ("tree_grpo", "reinforce_pp", "reinforce_pp_baseline", "opo", "gpg", "grpo_passk",
                                "remax", "mgrpo")


def default_penalty_placement(estimator: str) -> str:
    """``"row"``, or ``"episode"`` for the estimators in :data:`EPISODE_PLACEMENT_ESTIMATORS`."""
    return "episode" if estimator in EPISODE_PLACEMENT_ESTIMATORS else "row"


def invalid_action_penalty(rewards: Tensor, valid_action: Tensor, penalty: float) -> Tensor:
    """``[N]`` rewards minus ``penalty`` on every row whose action was invalid (the
    ``"episode"`` placement). The batch keeps raw rewards; this returns a new tensor."""
    if penalty < 0:
        raise ValueError(f"invalid-action penalty must be >= 0, got {penalty}")
    return rewards - penalty * (~valid_action.bool()).to(rewards.dtype)


def row_penalties(valid_action: Tensor, penalty: float) -> Tensor:
    """``[N]``: ``penalty`` on every row whose action was invalid, else 0 (the ``"row"``
    placement's ``AdvantageInputs.penalty``)."""
    if penalty < 0:
        raise ValueError(f"invalid-action penalty must be >= 0, got {penalty}")
    return penalty * (~valid_action.bool()).to(torch.float64)
