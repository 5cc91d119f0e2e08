"""The loss terms: aggregation, the clipped and REINFORCE surrogates, KL estimators and
importance weights, each a pure function.

Shapes: ``B`` responses (rows) of at most ``T`` tokens; ``mask`` ``[B, T]`` is 1 on tokens
that count. All functions return the loss with detached metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..registry import Registry

RATIO_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossScale:
    """The global normalisers of one optimizer step.

    A loss computed on a micro-batch divides by the counts of the *whole* mini-batch, so
    summing the gradients of any split into micro-batches (or processes) gives the
    gradient of the unsplit batch.

    - ``num_tokens``: unmasked tokens in the mini-batch (``token-mean``).
    - ``num_seqs``: rows in the mini-batch (``seq-mean-*``).
    - ``max_tokens``: the constant per-response normaliser of Dr. GRPO
      (``seq-mean-token-sum-norm``), usually the generation budget.
    """

    num_tokens: float
    num_seqs: float
    max_tokens: float = 1.0

    @staticmethod
    def of(mask: Tensor, max_tokens: float = 1.0) -> "LossScale":
        """The scale of a mini-batch that is processed whole (``mask`` ``[B, T]``)."""
        return LossScale(float(mask.sum()), float(mask.shape[0]), max_tokens)


#: ``fn(values [B, T], mask [B, T], scale) -> scalar``, by ``algo.loss_agg``
AGGREGATIONS: Registry[Callable[[Tensor, Tensor, LossScale], Tensor]] = Registry(
    "loss_aggregations", "algo.loss_agg", "loss aggregation", options=lambda fn: ())


@AGGREGATIONS.register("token-mean")
def token_mean(values: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Sum over all tokens / num_tokens (DAPO; every token weighs the same)."""
    return (values * mask).sum() / max(scale.num_tokens, 1.0)  # []


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(values: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Mean over each row's tokens, summed over rows / num_seqs (the original GRPO)."""
    per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_seq.sum() / max(scale.num_seqs, 1.0)


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(values: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Sum over each row's tokens, summed over rows / num_seqs."""
    return (values * mask).sum() / max(scale.num_seqs, 1.0)  # []


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(values: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Sum over all tokens / (num_seqs * max_tokens) (Dr. GRPO; TRL's dr_grpo exactly)."""
    return (values * mask).sum() / max(scale.num_seqs * scale.max_tokens, 1.0)  # []


LOSS_AGG_MODES = tuple(AGGREGATIONS.names())

Aggregation = Callable[[Tensor, Tensor, LossScale], Tensor]


def aggregate(values: Tensor, mask: Tensor, mode: "str | Aggregation", scale: LossScale) -> Tensor:
    """Reduce per-token ``values`` ``[B, T]`` to a scalar with aggregation ``mode`` (a
    function of :data:`AGGREGATIONS` or its name).

    - ``token-mean``: sum over all tokens / ``num_tokens`` (DAPO; every token weighs the same).
    - ``seq-mean-token-mean``: mean over each row's tokens, summed over rows / ``num_seqs``
      (the original GRPO).
    - ``seq-mean-token-sum``: sum over each row's tokens, summed over rows / ``num_seqs``.
    - ``seq-mean-token-sum-norm``: sum over all tokens / (``num_seqs`` * ``max_tokens``) (Dr. GRPO).
      This equals TRL's ``loss_type="dr_grpo"`` exactly. verl's option of the same name
      divides the token sum by ``max_tokens`` only (not by the number of sequences), so
      its loss, and at a fixed learning rate its step, is ``num_seqs`` times this one.

    An entropy bonus (``algo.entropy_coef``) is aggregated with the same mode as the
    policy loss; TRL always averages its entropy over tokens (``token-mean``).
    """
    fn = AGGREGATIONS.get(mode) if isinstance(mode, str) else mode
    return fn(values, mask.to(values.dtype), scale)  # []


def token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """``advantages`` ``[B]`` (one per row) as ``[B, 1]``, or ``[B, T]`` as they are, in
    ``like``'s dtype: what multiplies a ``[B, T]`` per-token term."""
    return (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).to(like.dtype)  # [B, 1] or [B, T]


def weigh_tokens(per_token: Tensor, tis_weights: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
    """The per-token loss ``[B, T]`` times the detached importance weights and the 0/1
    selection ``keep`` (each ``[B, T]`` or ``[B, 1]``, or None)."""
    for factor in (tis_weights, keep):
        if factor is not None:
            per_token = per_token * factor.detach().to(per_token.dtype)  # [B, T]
    return per_token


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values`` over the tokens of ``mask`` (0 without any)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)  # []


def _clipped_terms(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip_c: float | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token clipped loss ``[B, T]`` and float flags (clip taken, low clip, high clip)."""
    adv = token_advantages(advantages, ratio)  # [B, 1] or [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    loss = torch.maximum(unclipped, clipped)  # [B, T]
    with torch.no_grad():
        is_clipped = (clipped > unclipped).to(ratio.dtype)  # [B, T]
        low = ((ratio < 1.0 - clip_low) & (adv < 0)).to(ratio.dtype)  # [B, T]
        high = ((ratio > 1.0 + clip_high) & (adv > 0)).to(ratio.dtype)  # [B, T]
    if dual_clip_c is not None:
        # dual clip (Ye et al. 2020): for A < 0 the loss is capped at -A * c
        capped = torch.minimum(loss, -adv * dual_clip_c)  # [B, T]
        loss = torch.where(adv < 0, capped, loss)  # [B, T]
        with torch.no_grad():
            is_clipped = torch.maximum(is_clipped, ((adv < 0) & (ratio > dual_clip_c)).to(ratio.dtype))  # [B, T]
    return loss, is_clipped, low, high


#: GSPO's sequence log-ratio is clamped at this value before ``exp`` (as verl does)
SEQUENCE_LOG_RATIO_MAX = 10.0


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """GSPO's per-token log-ratio ``[B, T]``: its value is the row's length-normalised
    sequence log-ratio ``mean_t(log_ratio)``, clamped above at
    :data:`SEQUENCE_LOG_RATIO_MAX` (no gradient past it), and its gradient flows through
    each token's own log-prob (the GSPO-token form, Zheng et al. 2025)."""
    seq = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    return torch.clamp(seq.detach() + log_ratio - log_ratio.detach(), max=SEQUENCE_LOG_RATIO_MAX)  # [B, T]


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg: "str | Aggregation" = "token-mean",
    scale: LossScale | None = None,
    entropy: Tensor | None = None,
    global_advantages: Tensor | None = None,
    local_weight: Tensor | None = None,
    dual_clip_c: float | None = None,
    ratio_level: str = "token",
    tis_weights: Tensor | None = None,
    keep: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO clipped surrogate with separate lower and upper clip ranges.

    Schulman et al. 2017 (PPO) with the asymmetric range of Yu et al. 2025 (DAPO,
    "clip-higher"): per token, with ``r = exp(logprobs - old_logprobs)``,

        loss = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))

    Options: ``dual_clip_c`` (> 1) caps the loss of negative-advantage tokens at
    ``-A * c`` (dual-clip PPO, Ye et al. 2020); ``ratio_level="sequence"`` uses GSPO's
    length-normalised sequence ratio for every token of a row (Zheng et al. 2025, "Group
    Sequence Policy Optimization"; its clip range is about 1e-3 wide, 3e-4/4e-4 in the
    paper, and its aggregation ``seq-mean-token-mean``: ``AlgoConfig`` defaults to those);
    ``tis_weights`` ``[B, T]`` (detached) multiply the per-token loss (truncated
    importance sampling, see :func:`truncated_is_weights`); ``keep`` ``[B, T]`` (0/1)
    multiplies it too, after every row statistic is taken over ``mask`` (the tokens a
    selection leaves in the loss: the top-entropy tokens, the rows the off-policy mask
    keeps; the normalisers stay ``mask``'s, as TRL's).

    With one optimizer pass over freshly sampled rows, ``old_logprobs`` are the current
    log-probs detached, so every ratio, token or sequence, is exactly 1 and nothing is
    clipped: the loss gradient is the plain policy gradient (times ``tis_weights``).

    Args:
        logprobs: ``[B, T]`` log-probs of the taken tokens under the current policy.
        old_logprobs: ``[B, T]`` the same under the policy that sampled them.
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]``.
        mask: ``[B, T]`` 1 on tokens that count.
        scale: global normalisers (default: this batch alone).
        entropy: ``[B, T]`` per-token entropy, only reported.
        global_advantages, local_weight: ``[B]`` each, for COPO's two streams: the
            per-token loss becomes ``w * loss(advantages) + (1 - w) * loss(global_advantages)``.

    Returns:
        The scalar loss and detached metrics: ``clip_frac`` (tokens where the clipped
        term was taken), ``clip_frac_low``/``clip_frac_high`` (ratio below/above the
        range with an advantage that makes the clip bind), ``approx_kl`` (``k3`` estimate
        of KL(old || new)), ``ratio_mean``, ``ratio_max`` and ``entropy``.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape [B, T]"
        )
    if (global_advantages is None) != (local_weight is None):
        raise ValueError("global_advantages and local_weight come together")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    mask = mask.to(logprobs.dtype)  # [B, T]
    scale = scale or LossScale.of(mask)

    log_ratio = logprobs - old_logprobs  # [B, T]
    if ratio_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask)  # [B, T], each row's value its sequence's
    ratio = torch.exp(log_ratio)  # [B, T]
    # [B, T] each
    per_token, is_clipped, low, high = _clipped_terms(ratio, advantages, clip_low, clip_high, dual_clip_c)
    if global_advantages is not None:
        w = local_weight.to(logprobs.dtype).reshape(-1, 1)  # [B, 1]
        global_terms = _clipped_terms(ratio, global_advantages, clip_low, clip_high, dual_clip_c)  # [B, T] each
        per_token = w * per_token + (1 - w) * global_terms[0]  # [B, T]
        is_clipped, low, high = (w * a + (1 - w) * b for a, b in zip((is_clipped, low, high), global_terms[1:]))
    per_token = weigh_tokens(per_token, tis_weights, keep)  # [B, T]
    loss = aggregate(per_token, mask, loss_agg, scale)  # []

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(is_clipped, mask),
            "clip_frac_low": masked_mean(low, mask),
            "clip_frac_high": masked_mean(high, mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": (ratio * mask).max() if mask.any() else ratio.new_zeros(()),  # []
        }
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.to(mask.dtype), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}


def reinforce_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_agg: "str | Aggregation" = "token-mean",
    scale: LossScale | None = None,
    entropy: Tensor | None = None,
    tis_weights: Tensor | None = None,
    keep: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE without an importance ratio: per token ``-A * logprobs``.

    For strictly on-policy updates (one optimizer step per batch): its gradient equals the
    clipped loss's at ratio 1, with no clipping to compute. Shapes as in
    :func:`clipped_policy_loss`.
    """
    mask = mask.to(logprobs.dtype)  # [B, T]
    scale = scale or LossScale.of(mask)
    adv = token_advantages(advantages, logprobs)  # [B, 1] or [B, T]
    per_token = weigh_tokens(-adv * logprobs, tis_weights, keep)  # [B, T]
    metrics: dict[str, Tensor] = {}
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.detach().to(mask.dtype), mask)
    return aggregate(per_token, mask, loss_agg, scale), metrics  # []


#: ``fn(d [B, T], clamp) -> [B, T]`` of ``d = logprobs - ref_logprobs``, by ``algo.kl_estimator``
KL_ESTIMATORS: Registry[Callable[[Tensor, float], Tensor]] = Registry(
    "kl_estimators", "algo.kl_estimator", "KL estimator", options=lambda fn: ())


@KL_ESTIMATORS.register("k1")
def k1(d: Tensor, clamp: float) -> Tensor:
    """d: unbiased, high variance; as a loss its expected gradient is zero (noise only)."""
    return d  # [B, T]


@KL_ESTIMATORS.register("k2")
def k2(d: Tensor, clamp: float) -> Tensor:
    """d^2 / 2: biased, low variance; as a loss, the gradient of KL(policy || reference)."""
    return 0.5 * d * d  # [B, T]


@KL_ESTIMATORS.register("k3")
def k3(d: Tensor, clamp: float) -> Tensor:
    """exp(-d) - 1 + d, clamped (verl): as a loss, the gradient of KL(reference || policy)."""
    return torch.clamp(torch.exp(-d) - 1 + d, min=-clamp, max=clamp)  # [B, T]


@KL_ESTIMATORS.register("abs")
def kl_abs(d: Tensor, clamp: float) -> Tensor:
    """|d| (verl's abs): biased; as a loss, sign(d) times the log-prob's gradient."""
    return d.abs()  # [B, T]


def straight_through(estimate: Callable[[Tensor, float], Tensor]) -> Callable[[Tensor, float], Tensor]:
    """``estimate``'s value with k2's gradient (verl's ``+`` modes): the penalty reported
    and added is the estimator's, the gradient that of KL(policy || reference)."""

    def fn(d: Tensor, clamp: float) -> Tensor:
        grad_of = k2(d, clamp)  # [B, T]
        return grad_of - grad_of.detach() + estimate(d, clamp).detach()  # [B, T]

    return fn


KL_ESTIMATORS.register("k1+", description="k1's value, k2's gradient (straight-through): the gradient of "
                       "KL(policy || reference)")(straight_through(k1))
KL_ESTIMATORS.register("k3+", description="k3's value, k2's gradient (straight-through, verl's low_var_kl+): the "
                       "gradient of KL(policy || reference)")(straight_through(k3))
KL_ESTIMATORS.register("abs+", description="|d|'s value, k2's gradient (straight-through)")(straight_through(kl_abs))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: "str | Callable[[Tensor, float], Tensor]" = "k3",
               clamp: float = 10.0) -> Tensor:
    """Per-token estimate ``[B, T]`` of KL(policy || reference) from samples of the policy,
    with ``estimator`` (a function of :data:`KL_ESTIMATORS` or its name).

    With ``d = logprobs - ref_logprobs`` (Schulman 2020, "Approximating KL Divergence"):
    ``k1 = d`` (unbiased, high variance, can be negative), ``k2 = d^2 / 2`` (low variance,
    biased), ``k3 = exp(-d) - 1 + d`` (unbiased, low variance, non-negative; clamped to
    ``[-clamp, clamp]`` as in verl, since ``exp(-d)`` explodes where the policy has
    moved far below the reference); ``abs = |d|``; the straight-through ``k1+``, ``k3+``
    and ``abs+`` take their estimator's value and ``k2``'s gradient (verl's ``+`` modes).

    As a *loss* the estimates are differentiated through ``logprobs`` on samples that
    stay fixed, and their expected gradients are not all that of KL(policy || reference):

    - ``k1``: ``E_pi[grad log pi] = 0``: no KL gradient at all, only noise;
    - ``k2``: ``E_pi[d grad log pi]``, the gradient of KL(policy || reference);
    - ``k3``: ``E_pi[(1 - ref / pi) grad log pi] = -sum ref grad log pi``, the gradient
      of the forward KL(reference || policy).

    ``tests/test_loss_terms.py`` checks each by exact expectation over a small vocabulary.
    """
    fn = KL_ESTIMATORS.get(estimator) if isinstance(estimator, str) else estimator
    return fn(logprobs - ref_logprobs, clamp)  # [B, T]


def bias_corrected_kl(kl: Tensor, logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """The KL estimate weighted by the importance ratio ``pi / pi_old`` (with its
    gradient), DeepSeek-AI 2025, "DeepSeek-V3.2", as TRL's ``use_bias_correction_kl``.

    The samples come from ``pi_old``, so ``E_old[(pi / pi_old) k(x)] = E_pi[k(x)]``, and
    differentiating the weighted estimate gives the score-function term that the plain
    estimate lacks: with ``k3`` its expected gradient is that of KL(policy || reference)
    itself (``tests/test_loss_terms.py`` checks it exactly). On a batch's first pass the
    ratio is 1 in value and only its gradient acts. Shapes ``[B, T]``."""
    return kl * torch.exp(logprobs - old_logprobs.detach())  # [B, T]


def behaviour_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, stale: Tensor,
                      tis_cap: float | None, stale_cap: float, tis_level: Callable[[Tensor, Tensor], Tensor] | None = None
                      ) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Per-token importance weights between the policy the update starts from and the
    policy that sampled each row (decoupled PPO: Hilton et al. 2022, "Batch size-invariance
    for policy optimization"; the PPO ratio stays ``pi / pi_old``).

    - ``stale`` rows (``[B]`` bool; sampled by an earlier policy, e.g. AR3PO's reused
      episodes): ``min(pi_old / pi_behaviour, stale_cap)``, ``rollout_logprobs`` being the
      behaviour policy's;
    - the other rows: :func:`truncated_is_weights` with ``tis_cap`` (at ``tis_level``,
      :mod:`~grpo_lab.losses.rollout_correction`; default each token's own), or 1
      without one.

    Returns ``None`` (no weights) when no row is stale and ``tis_cap`` is None, and metrics
    ``tis_weight_mean``/``tis_frac_truncated`` (fresh rows, with TIS) and
    ``off_policy_weight_mean``/``off_policy_frac_truncated`` (stale rows).
    """
    if stale_cap <= 0:
        raise ValueError(f"the off-policy importance cap must be > 0, got {stale_cap}")
    stale = stale.to(torch.bool).reshape(-1, 1).expand_as(mask)  # [B, T]
    if tis_cap is None and not bool(stale.any()):
        return None, {}
    stale_mask = mask * stale.to(mask.dtype)  # [B, T]
    fresh_mask = mask * (~stale).to(mask.dtype)  # [B, T]
    stale_weights, stale_metrics = truncated_is_weights(old_logprobs, rollout_logprobs, stale_mask, stale_cap)  # [B, T]
    metrics: dict[str, Tensor] = {}
    if tis_cap is None:
        fresh_weights = torch.ones_like(stale_weights)  # [B, T]
    else:
        # [B, T]
        fresh_weights, fresh_metrics = truncated_is_weights(old_logprobs, rollout_logprobs, fresh_mask, tis_cap,
                                                            tis_level)
        if bool(fresh_mask.any()):
            metrics.update(fresh_metrics)
    if bool(stale_mask.any()):
        metrics["off_policy_weight_mean"] = stale_metrics["tis_weight_mean"]
        metrics["off_policy_frac_truncated"] = stale_metrics["tis_frac_truncated"]
    return torch.where(stale, stale_weights, fresh_weights), metrics  # [B, T]


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float,
                         level: Callable[[Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling between the sampler and the trainer.

    The rollout engine and the trainer never compute exactly the same probabilities (other
    kernels, precision, batching), so samples are slightly off-policy for the trainer.
    Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training") reweight each token by ``min(pi_train_old / pi_rollout, cap)``.

    Args:
        old_logprobs: ``[B, T]`` the trainer's log-probs of the sampled tokens under the
            sampling policy's weights.
        rollout_logprobs: ``[B, T]`` the sampler's log-probs of the same tokens.
        cap: the truncation ``C`` (> 0).
        level: ``fn(log_ratio [B, T], mask [B, T]) -> [B, T]``, the ratio each token is
            weighted by (:data:`~grpo_lab.losses.rollout_correction.RATIO_LEVELS_OF_ROWS`:
            a row's product or geometric mean); ``None``: each token's own.

    Returns:
        detached weights ``[B, T]`` and metrics ``tis_weight_mean`` and ``tis_frac_truncated``.
    """
    if cap <= 0:
        raise ValueError(f"the truncated-IS cap must be > 0, got {cap}")
    log_ratio = (old_logprobs - rollout_logprobs).detach()  # [B, T]
    if level is not None:
        log_ratio = torch.clamp(level(log_ratio * mask.to(log_ratio.dtype), mask.to(log_ratio.dtype)), max=50.0)  # [B, T]
    raw = torch.exp(log_ratio)  # [B, T]
    weights = torch.clamp(raw, max=cap)  # [B, T]
    mask = mask.to(weights.dtype)  # [B, T]
    return weights, {
        "tis_weight_mean": masked_mean(weights, mask),
        "tis_frac_truncated": masked_mean((raw > cap).to(weights.dtype), mask),
    }
