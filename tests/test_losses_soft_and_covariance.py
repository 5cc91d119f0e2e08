"""SAPO, VESPO, Clip-Cov and KL-Cov: hand-worked losses and gradients (numbers from the
papers' formulas with ``math``, never from the code under test), each at ratio 1 against
the plain policy gradient it must reduce to, and their parameters through the registry."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.config import AlgoConfig, ConfigError
from grpo_lab.losses import POLICY_LOSSES, LossScale, Objective, reinforce_loss
from grpo_lab.losses.covariance import clip_cov_loss, kl_cov_loss
from grpo_lab.losses.sapo import sapo_loss
from grpo_lab.losses.vespo import gamma_weights, vespo_loss

OLD = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.4, 0.2, 0.9]], dtype=torch.float64))
NEW = torch.log(torch.tensor([[0.5, 0.75, 0.25], [0.6, 0.2, 0.1]], dtype=torch.float64))
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
RATIOS = [[1.0, 1.5, 0.5], [1.5, 1.0, None]]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reinforce_grad(loss_agg: str = "token-mean") -> torch.Tensor:
    plain = NEW.clone().requires_grad_(True)
    reinforce_loss(plain, ADV, MASK, loss_agg=loss_agg, scale=LossScale.of(MASK))[0].backward()
    return plain.grad


def test_sapo_hand_worked_loss_and_gradient():
    """Per token -A * sigmoid(tau (r - 1)) * 4 / tau, tau = 1 for A > 0 and 1.05 otherwise;
    d/dlogp = -A * 4 s (1 - s) * r. Token-mean over the 5 tokens."""
    logp = NEW.clone().requires_grad_(True)
    loss, _ = sapo_loss(logp, OLD, ADV, MASK, tau_pos=1.0, tau_neg=1.05, loss_agg="token-mean",
                        scale=LossScale.of(MASK))
    value, grads = 0.0, torch.zeros(2, 3, dtype=torch.float64)
    for b, row in enumerate(RATIOS):
        a = float(ADV[b])
        tau = 1.0 if a > 0 else 1.05
        for t, r in enumerate(row):
            if r is None:
                continue
            s = sigmoid(tau * (r - 1))
            value += -a * s * 4 / tau / 5
            grads[b, t] = -a * 4 * s * (1 - s) * r / 5
    assert float(loss.detach()) == pytest.approx(value, abs=1e-12)
    loss.backward()
    assert torch.allclose(logp.grad, grads, atol=1e-12)


def test_sapo_at_ratio_one_is_the_policy_gradient():
    logp = NEW.clone().requires_grad_(True)
    sapo_loss(logp, NEW, ADV, MASK, tau_pos=1.0, tau_neg=1.05, loss_agg="token-mean",
              scale=LossScale.of(MASK))[0].backward()
    assert torch.allclose(logp.grad, reinforce_grad(), atol=1e-12)


def test_vespo_hand_worked_weights_loss_and_gradient():
    """Row 0 (A >= 0: k=2, lambda=3): log w = 0 + log 1.5 + log 0.5 = log 0.75; row 1 (A < 0:
    k=3, lambda=2): log w = log 1.5. phi = exp(lambda + k log w - lambda w); per token
    -phi A logp, phi detached: d/dlogp = -phi A / 5."""
    phi0 = math.exp(3 + 2 * math.log(0.75) - 3 * 0.75)
    phi1 = math.exp(2 + 3 * math.log(1.5) - 2 * 1.5)
    logp = NEW.clone().requires_grad_(True)
    loss, metrics = vespo_loss(logp, OLD, ADV, MASK, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0,
                               loss_agg="token-mean", scale=LossScale.of(MASK))
    phi = torch.tensor([[phi0], [phi1]], dtype=torch.float64)
    assert float(loss.detach()) == pytest.approx(float(-(phi * ADV[:, None] * NEW * MASK).sum() / 5), abs=1e-12)
    loss.backward()
    assert torch.allclose(logp.grad, -phi * ADV[:, None] * MASK / 5, atol=1e-12)
    assert float(metrics["phi_seq_mean"]) == pytest.approx((phi0 + phi1) / 2)


def test_vespo_is_one_at_ratio_one_and_folds_the_sampler_weights_into_w():
    logp = NEW.clone().requires_grad_(True)
    vespo_loss(logp, NEW, ADV, MASK, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0, loss_agg="token-mean",
               scale=LossScale.of(MASK))[0].backward()
    assert torch.allclose(logp.grad, reinforce_grad(), atol=1e-12)
    tis = torch.tensor([[2.0, 1.0, 1.0], [0.5, 1.0, 7.0]], dtype=torch.float64)  # the masked 7 must not count
    phi = gamma_weights(torch.zeros_like(NEW), ADV, MASK, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0,
                        tis_weights=tis)
    assert float(phi[0]) == pytest.approx(math.exp(3 + 2 * math.log(2.0) - 3 * 2.0))
    assert float(phi[1]) == pytest.approx(math.exp(2 + 3 * math.log(0.5) - 2 * 0.5))


# Clip-Cov and KL-Cov: 2 rows x 3 tokens, every token trained; A = (2, -2), mean 0.
COV_LOGP = torch.tensor([[-0.1, -1.0, -3.0], [-0.5, -2.0, -0.2]], dtype=torch.float64)
COV_ADV = torch.tensor([2.0, -2.0], dtype=torch.float64)
COV_MASK = torch.ones(2, 3, dtype=torch.float64)
# mean log-prob -6.8 / 6; cov = A (logp - mean): (2.067, 0.267, -3.733 | -1.267, 1.733, -1.867)


def test_clip_cov_removes_the_gradient_of_the_tokens_in_the_covariance_band():
    """Only (0, 0) and (1, 1) have 1 < cov < 5; a share of 0.5 picks min(3, 2) = both: their
    gradients are 0, every other token keeps PPO's -A r / 6 (ratio 1 here)."""
    logp = COV_LOGP.clone().requires_grad_(True)
    loss, metrics = clip_cov_loss(logp, COV_LOGP, COV_ADV, COV_MASK, clip_low=0.2, clip_high=0.28, clip_ratio=0.5,
                                  cov_lower=1.0, cov_upper=5.0, loss_agg="token-mean", scale=LossScale.of(COV_MASK))
    loss.backward()
    expected = -COV_ADV[:, None].expand(2, 3) / 6
    expected = expected.clone()
    expected[0, 0] = expected[1, 1] = 0.0
    assert torch.allclose(logp.grad, expected, atol=1e-12)
    assert float(metrics["cov_selected_frac"]) == pytest.approx(2 / 6)


def test_clip_cov_picks_at_least_one_at_random_and_never_a_token_the_clip_cut():
    torch.manual_seed(0)
    picked = set()
    for _ in range(20):  # share 2e-4 of 6 tokens: one of the two candidates, at random
        logp = COV_LOGP.clone().requires_grad_(True)
        clip_cov_loss(logp, COV_LOGP, COV_ADV, COV_MASK, clip_low=0.2, clip_high=0.28, clip_ratio=2e-4, cov_lower=1.0,
                      cov_upper=5.0, loss_agg="token-mean", scale=LossScale.of(COV_MASK))[0].backward()
        zeros = [(b, t) for b in range(2) for t in range(3) if float(logp.grad[b, t]) == 0.0]
        assert len(zeros) == 1
        picked.add(zeros[0])
    assert picked == {(0, 0), (1, 1)}
    # token (0, 0) at ratio 1.5 with A > 0 is clipped already: only (1, 1) is left to pick
    old = COV_LOGP.clone()
    old[0, 0] -= math.log(1.5)
    logp = COV_LOGP.clone().requires_grad_(True)
    clip_cov_loss(logp, old, COV_ADV, COV_MASK, clip_low=0.2, clip_high=0.28, clip_ratio=0.5, cov_lower=1.0,
                  cov_upper=5.0, loss_agg="token-mean", scale=LossScale.of(COV_MASK))[0].backward()
    assert float(logp.grad[1, 1]) == 0.0 and float(logp.grad[0, 0]) == 0.0  # the clip's own zero at (0, 0)
    assert float(logp.grad[0, 1]) == pytest.approx(-2.0 / 6)


def test_kl_cov_penalises_the_top_covariance_token_by_its_abs_log_ratio():
    """One token (max(int(6 * 2e-4), 1)) with the top cov, (0, 0), gets + |log r|: at log r =
    0.3 its gradient is -A r + 1 * sign(0.3); the others keep -A r (all / 6); no clip."""
    old = COV_LOGP.clone()
    old[0, 0] -= 0.3
    old[1, 2] += 2.0  # ratio e^-2 with A < 0: PPO would clip, KL-Cov does not
    logp = COV_LOGP.clone().requires_grad_(True)
    loss, _ = kl_cov_loss(logp, old, COV_ADV, COV_MASK, kl_ratio=2e-4, kl_coef=1.0, loss_agg="token-mean",
                          scale=LossScale.of(COV_MASK))
    ratio = torch.exp(COV_LOGP - old)
    value = (-(COV_ADV[:, None] * ratio).sum() + 0.3) / 6
    assert float(loss.detach()) == pytest.approx(float(value), abs=1e-12)
    loss.backward()
    expected = -COV_ADV[:, None] * ratio / 6
    expected[0, 0] += 1.0 / 6
    assert torch.allclose(logp.grad, expected, atol=1e-12)


def test_kl_cov_at_ratio_one_is_the_policy_gradient():
    logp = NEW.clone().requires_grad_(True)
    kl_cov_loss(logp, NEW, ADV, MASK, kl_ratio=0.5, kl_coef=1.0, loss_agg="token-mean",
                scale=LossScale.of(MASK))[0].backward()
    assert torch.allclose(logp.grad, reinforce_grad(), atol=1e-12)


@pytest.mark.parametrize("name", ["sapo", "vespo"])
def test_split_into_micro_batches_the_gradients_add_up_to_the_whole(name):
    objective = Objective(policy_loss=POLICY_LOSSES.get(name))
    whole = NEW.clone().requires_grad_(True)
    objective.policy_loss(whole, OLD, ADV, MASK, objective, scale=LossScale.of(MASK))[0].backward()
    split = NEW.clone().requires_grad_(True)
    for rows in ([0], [1]):
        objective.policy_loss(split[rows], OLD[rows], ADV[rows], MASK[rows], objective,
                              scale=LossScale.of(MASK))[0].backward()
    assert torch.allclose(whole.grad, split.grad, atol=1e-12)


def test_loss_params_reach_the_loss_and_bad_ones_are_named():
    a = AlgoConfig(policy_loss="sapo", loss_params={"tau_pos": 2.0})
    a.validate()
    objective = a.objective()
    assert dict(objective.loss_params) == {"tau_pos": 2.0, "tau_neg": 1.05}
    logp = NEW.clone()
    loss, _ = objective.policy_loss(logp, NEW, ADV, MASK, objective, scale=LossScale.of(MASK))
    # at r = 1 every token's loss is -A * 2 / tau: (3 tokens / tau 2) and (2 tokens * 2 / tau 1.05)
    assert float(loss.detach()) == pytest.approx((-3 * 2 / 2.0 + 2 * 2 * 2 / 1.05) / 5)
    with pytest.raises(ConfigError, match=r"\['tau'\].*its parameters: \['tau_neg', 'tau_pos'\]"):
        AlgoConfig(policy_loss="sapo", loss_params={"tau": 1.0}).validate()
    with pytest.raises(ConfigError, match="clip_ratio=2.0"):
        AlgoConfig(policy_loss="clip_cov", loss_params={"clip_ratio": 2.0}).validate()
    with pytest.raises(ConfigError, match="its parameters: none"):
        AlgoConfig(policy_loss="ppo_clip", loss_params={"tau_pos": 1.0}).validate()


def test_a_token_selection_leaves_the_row_statistics_whole():
    """Dropping token (0, 1) from the loss (top-entropy style) keeps VESPO's w over the
    whole row (phi0 as without a selection) and only zeroes that token's gradient; the
    normaliser stays the 5 tokens."""
    keep = torch.ones(2, 3, dtype=torch.float64)
    keep[0, 1] = 0.0
    phi0 = math.exp(3 + 2 * math.log(0.75) - 3 * 0.75)
    phi1 = math.exp(2 + 3 * math.log(1.5) - 2 * 1.5)
    logp = NEW.clone().requires_grad_(True)
    vespo_loss(logp, OLD, ADV, MASK, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0, loss_agg="token-mean",
               scale=LossScale.of(MASK), keep=keep)[0].backward()
    phi = torch.tensor([[phi0], [phi1]], dtype=torch.float64)
    assert torch.allclose(logp.grad, -phi * ADV[:, None] * MASK * keep / 5, atol=1e-12)
    # GSPO's sequence ratio, too, is the whole row's: the kept tokens' gradients are unchanged
    from grpo_lab.losses import clipped_policy_loss

    grads = []
    for k in (None, keep):
        lp = NEW.clone().requires_grad_(True)
        clipped_policy_loss(lp, OLD, ADV, MASK, clip_low=0.5, clip_high=0.5, ratio_level="sequence",
                            scale=LossScale.of(MASK), keep=k)[0].backward()
        grads.append(lp.grad)
    assert torch.allclose(grads[1], grads[0] * keep, atol=1e-12)
