"""Losses (``grpo_lab.losses``): pure functions of log-probs, advantages and masks.

:mod:`~grpo_lab.losses.terms` holds the terms (aggregations, the clipped and REINFORCE
surrogates, KL estimators, importance weights); :mod:`~grpo_lab.losses.policy` the policy
losses behind one signature and the :class:`Objective` an update minimises. Each named
choice (``algo.policy_loss``, ``algo.loss_agg``, ``algo.kl_estimator``) is a registry.
"""

from . import cispo as _cispo  # noqa: F401  (each import registers its loss)
from . import covariance as _covariance  # noqa: F401
from . import gmpo as _gmpo  # noqa: F401
from . import sapo as _sapo  # noqa: F401
from . import vespo as _vespo  # noqa: F401
from .rollout_correction import RATIO_LEVELS_OF_ROWS, off_policy_sequence_keep, rejection_keep
from .token_selection import high_entropy_keep
from .policy import POLICY_LOSSES, Objective, PolicyLoss, register_policy_loss
from .terms import (AGGREGATIONS, KL_ESTIMATORS, LOSS_AGG_MODES, RATIO_LEVELS, LossScale, aggregate, behaviour_weights,
                    bias_corrected_kl, clipped_policy_loss, kl_penalty, reinforce_loss, truncated_is_weights)

__all__ = ["RATIO_LEVELS_OF_ROWS", "rejection_keep", "off_policy_sequence_keep", "high_entropy_keep", "bias_corrected_kl", "AGGREGATIONS", "KL_ESTIMATORS", "LOSS_AGG_MODES", "POLICY_LOSSES", "RATIO_LEVELS", "LossScale", "Objective",
           "PolicyLoss", "aggregate", "behaviour_weights", "clipped_policy_loss", "kl_penalty", "register_policy_loss",
           "reinforce_loss", "truncated_is_weights"]
