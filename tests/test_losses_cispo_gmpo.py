"""CISPO and GMPO: hand-worked losses, their gradients against the formulas, and each at
ratio 1 against the plain policy gradient it must reduce to."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.losses import LossScale, POLICY_LOSSES, reinforce_loss
from grpo_lab.losses.cispo import cispo_loss
from grpo_lab.losses.gmpo import geometric_mean_loss

#: two rows of three tokens (the second row's last token masked)
OLD = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.4, 0.2, 0.9]], dtype=torch.float64))
NEW = torch.log(torch.tensor([[0.5, 0.75, 0.25], [0.6, 0.2, 0.1]], dtype=torch.float64))
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)


def test_cispo_hand_worked_loss_and_gradient():
    """Ratios (1, 1.5, 0.5 | 1.5, 1): clipped to [0.8, 1.28]: (1, 1.28, 0.8 | 1.28, 1).
    Token-mean over 5 tokens: loss = -(1*1*lp + 1.28*lp + 0.8*lp | -2*1.28*lp - 2*lp) / 5,
    and d loss / d logp_t = -w_t A / 5 (the weight carries no gradient)."""
    logp = NEW.clone().requires_grad_(True)
    loss, metrics = cispo_loss(logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.28, loss_agg="token-mean",
                               scale=LossScale.of(MASK))
    w = torch.tensor([[1.0, 1.28, 0.8], [1.28, 1.0, 0.0]], dtype=torch.float64)
    expected = -(w * ADV[:, None] * NEW * MASK).sum() / 5
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-12)
    loss.backward()
    assert torch.allclose(logp.grad, -w * ADV[:, None] * MASK / 5, atol=1e-12)
    assert float(metrics["clip_frac"]) == pytest.approx(3 / 5)  # 1.5, 0.5 and 1.5 were clipped


def test_cispo_at_ratio_one_is_reinforce_and_its_clip_lower_bound_can_be_off():
    logp = NEW.clone().requires_grad_(True)
    cispo_loss(logp, NEW, ADV, MASK, clip_low=0.2, clip_high=0.28, loss_agg="token-mean",
               scale=LossScale.of(MASK))[0].backward()
    plain = NEW.clone().requires_grad_(True)
    reinforce_loss(plain, ADV, MASK, loss_agg="token-mean", scale=LossScale.of(MASK))[0].backward()
    assert torch.allclose(logp.grad, plain.grad, atol=1e-12)
    logp = NEW.clone().requires_grad_(True)
    cispo_loss(logp, OLD, ADV, MASK, clip_low=1.0, clip_high=0.28, loss_agg="token-mean",
               scale=LossScale.of(MASK))[0].backward()
    assert float(logp.grad[0, 2]) == pytest.approx(-0.5 * 1.0 / 5)  # ratio 0.5 kept: no lower bound


def test_gmpo_hand_worked_loss_and_gradient():
    """log-ratios (0, log 1.5, log 0.5 | log 1.5, 0), clipped in log space at +-0.4: row 0
    (A > 0) keeps min(lr, clip(lr)): (0, 0.4, log 0.5); row 1 (A < 0) keeps max: (log 1.5,
    0) (log 1.5 = 0.405 > 0.4, so the unclipped one). Ratios exp(mean): row 0
    exp((0.4 + log 0.5) / 3), row 1 exp(log 1.5 / 2) = sqrt(1.5). Loss: mean over the 2 rows
    of -A * ratio; the gradient of row 0 reaches its unclipped tokens only, A * ratio / 3 / 2."""
    logp = NEW.clone().requires_grad_(True)
    loss, _ = geometric_mean_loss(logp, OLD, ADV, MASK, clip_low=0.4, clip_high=0.4, scale=LossScale.of(MASK))
    r0 = math.exp((0.4 + math.log(0.5)) / 3)
    r1 = math.sqrt(1.5)
    assert float(loss.detach()) == pytest.approx((-1.0 * r0 + 2.0 * r1) / 2, abs=1e-7)  # lengths + 1e-8, as verl
    loss.backward()
    expected = torch.tensor([[-r0 / 3 / 2, 0.0, -r0 / 3 / 2], [2 * r1 / 2 / 2, 2 * r1 / 2 / 2, 0.0]],
                            dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, atol=1e-7)


def test_gmpo_at_ratio_one_is_the_sequence_mean_policy_gradient():
    logp = NEW.clone().requires_grad_(True)
    geometric_mean_loss(logp, NEW, ADV, MASK, clip_low=0.4, clip_high=0.4, scale=LossScale.of(MASK))[0].backward()
    plain = NEW.clone().requires_grad_(True)
    reinforce_loss(plain, ADV, MASK, loss_agg="seq-mean-token-mean", scale=LossScale.of(MASK))[0].backward()
    assert torch.allclose(logp.grad, plain.grad, atol=1e-7)


def test_split_into_micro_batches_the_gradients_add_up_to_the_whole():
    """Each micro-batch divides by the whole mini-batch's counts (LossScale)."""
    scale = LossScale.of(MASK)
    for fn in (lambda lp, rows: cispo_loss(lp[rows], OLD[rows], ADV[rows], MASK[rows], clip_low=0.2, clip_high=0.28,
                                           loss_agg="token-mean", scale=scale)[0],
               lambda lp, rows: geometric_mean_loss(lp[rows], OLD[rows], ADV[rows], MASK[rows], clip_low=0.4,
                                                    clip_high=0.4, scale=scale)[0]):
        whole = NEW.clone().requires_grad_(True)
        fn(whole, slice(0, 2)).backward()
        parts = NEW.clone().requires_grad_(True)
        (fn(parts, slice(0, 1)) + fn(parts, slice(1, 2))).backward()
        assert torch.allclose(whole.grad, parts.grad, atol=1e-12)


def test_both_are_registered_with_ratios_and_their_configs_load():
    from grpo_lab.train import compose_config

    assert POLICY_LOSSES.get("cispo").ratio and POLICY_LOSSES.get("geo_mean").ratio
    cispo = compose_config(["algo=cispo", "trainer.epochs_per_batch=2"])
    assert cispo.algo.policy_loss == "cispo" and cispo.algo.clip_low == 1.0
    gmpo = compose_config(["algo=gmpo"])
    assert gmpo.algo.policy_loss == "geo_mean" and (gmpo.algo.clip_low, gmpo.algo.clip_high) == (0.4, 0.4)
