"""Policy losses behind one signature, and the objective a run resolves its ``algo``
settings into.

A policy loss is ``fn(logprobs, old_logprobs, advantages, mask, objective, *, scale,
entropy, tis_weights, keep, streams) -> (loss, metrics)``, as verl's ``PolicyLossFn`` is one
signature over its registry: the update calls whichever ``algo.policy_loss`` names
without knowing which. Register another with ``@register_policy_loss("name")``; a loss
with hyper-parameters of its own declares them with their defaults
(``params={"tau_pos": 1.0}``) and reads them from ``objective.loss_params``, which
``algo.loss_params`` overrides (an unknown key raises, naming the valid ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from torch import Tensor

from ..registry import Registry, first_line
from .terms import Aggregation, LossScale, clipped_policy_loss, reinforce_loss, token_mean

PolicyLossFn = Callable[..., "tuple[Tensor, dict[str, Tensor]]"]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss: ``fn`` with the signature of the module docstring.

    ``ratio``: it weighs tokens by ``pi / pi_old``, so it may take several optimizer passes
    per batch (``False``: strictly on-policy, one pass). ``streams``: it reads the
    estimator's extra ``[B]`` streams (COPO's ``global_advantages`` and ``local_weight``).
    ``params``: its own hyper-parameters with their defaults; ``check(params)`` raises
    ``ValueError`` naming a bad value."""

    name: str
    fn: PolicyLossFn
    ratio: bool = True
    streams: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] | None = None

    def _typed(self, key: str, value: Any) -> Any:
        """``value`` in the type of the parameter's default (a number stays a number);
        ``ValueError`` naming the key otherwise."""
        default = self.params[key]
        if not isinstance(default, (int, float)) or isinstance(default, bool):
            return value
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return type(default)(value)
            except ValueError:
                pass
        raise ValueError(f"algo.loss_params.{key}={value!r} is invalid: expected a number (policy loss {self.name!r}, "
                         f"default {default!r})")

    def settings(self, given: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
        """Its parameters: the defaults overridden by ``given`` (``algo.loss_params``),
        checked; an unknown key raises ``ValueError`` naming the valid ones."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            valid = sorted(self.params) or "none"
            raise ValueError(f"algo.loss_params {unknown} are not parameters of policy loss {self.name!r} "
                             f"(its parameters: {valid})")
        for key, value in given.items():
            given[key] = self._typed(key, value)
        merged = {**self.params, **given}
        if self.check is not None:
            self.check(merged)
        return MappingProxyType(merged)

    def __call__(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                 objective: "Objective", **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        return self.fn(logprobs, old_logprobs, advantages, mask, objective, **kwargs)


#: :class:`PolicyLoss` objects by ``algo.policy_loss``
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy_losses", "algo.policy_loss", "policy loss",
                                               options=lambda loss: ())


def register_policy_loss(name: str, *, ratio: bool = True, streams: bool = False, options: tuple[str, ...] = (),
                         params: Mapping[str, Any] | None = None,
                         check: Callable[[Mapping[str, Any]], None] | None = None
                         ) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register ``fn`` as ``algo.policy_loss=name`` (its docstring's first line describes
    it; ``options``: the ``algo`` keys it reads; ``params``: its own hyper-parameters
    and their defaults, set with ``algo.loss_params``, and ``check`` their test); a taken
    name raises."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        loss = PolicyLoss(name, fn, ratio, streams, MappingProxyType(dict(params or {})), check)
        listed = options + tuple(f"loss_params.{k}={v!r}" for k, v in (params or {}).items())
        POLICY_LOSSES.register(name, loss, description=first_line(fn), options=listed)
        return fn

    return deco


@dataclass(frozen=True)
class Objective:
    """What one update minimises, every name resolved: the policy loss, its aggregation,
    its clip settings, the KL penalty to the reference and the entropy bonus, and the
    importance weights of rows the update's policy did not sample.

    ``kl_estimator`` and ``aggregation`` are the functions of
    :data:`~grpo_lab.losses.terms.KL_ESTIMATORS` and
    :data:`~grpo_lab.losses.terms.AGGREGATIONS`."""

    policy_loss: PolicyLoss
    aggregation: Aggregation = token_mean
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip_c: float | None = None
    ratio_level: str = "token"
    kl_coef: float = 0.0
    kl_estimator: Callable[[Tensor, float], Tensor] | None = None
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    off_policy_is_cap: float = 2.0
    tis_level: Callable[[Tensor, Tensor], Tensor] | None = None  # None: token (rollout_correction.RATIO_LEVELS_OF_ROWS)
    rejection: Callable[[Tensor, Tensor], Tensor] | None = None  # a level: tokens or rows out of the band leave the loss
    rejection_band: tuple[float, float] = (0.5, 2.0)
    loss_params: Mapping[str, Any] = field(default_factory=dict)  # the policy loss's own: its defaults, these overriding
    kl_bias_correction: bool = False  # the KL term weighted by pi / pi_old (DeepSeek-V3.2; TRL's use_bias_correction_kl)
    off_policy_mask_threshold: float | None = None  # DeepSeek-V3.2's off-policy sequence mask (rollout_correction)
    top_entropy_quantile: float = 1.0  # < 1: the policy loss on the top-rho entropy tokens only (token_selection)
    every_row: bool = False  # run every row, with or without advantage (an adaptive entropy coefficient measures all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_params", self.policy_loss.settings(self.loss_params))

    @property
    def trains_every_row(self) -> bool:
        """A KL or entropy term trains rows without advantage too."""
        return self.kl_coef > 0 or self.entropy_coef > 0 or self.every_row


@register_policy_loss("ppo_clip", streams=True, options=("clip_low", "clip_high", "dual_clip_c", "ratio_level"))
def ppo_clip(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, objective: Objective, *,
             scale: LossScale, entropy: Tensor | None = None, tis_weights: Tensor | None = None,
             keep: Tensor | None = None, streams: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate with DAPO's clip-higher; dual clip and GSPO's sequence ratio as options."""
    return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=objective.clip_low,
                               clip_high=objective.clip_high, loss_agg=objective.aggregation, scale=scale,
                               entropy=entropy, dual_clip_c=objective.dual_clip_c, ratio_level=objective.ratio_level,
                               tis_weights=tis_weights, keep=keep, **dict(streams or {}))


@register_policy_loss("reinforce", ratio=False)
def reinforce(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, objective: Objective, *,
              scale: LossScale, entropy: Tensor | None = None, tis_weights: Tensor | None = None,
              keep: Tensor | None = None, streams: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE without an importance ratio (strictly on-policy: one optimizer pass per batch)."""
    return reinforce_loss(logprobs, advantages, mask, loss_agg=objective.aggregation, scale=scale, entropy=entropy,
                          tis_weights=tis_weights, keep=keep)
