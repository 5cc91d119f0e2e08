"""The clipped policy loss against hand computation, and loss scale under micro-batching."""

import math

import pytest
import torch

from grpo_lab.losses import LOSS_AGG_MODES, LossScale, aggregate, clipped_policy_loss


def hand_example():
    # row 0: A = +1, ratios 1.5 and 0.9; row 1: A = -2, ratio 0.5 and a masked token
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.1]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    return logp, old, adv, mask


def test_clipped_loss_matches_hand_computation():
    # per token, max(-A r, -A clip(r, 0.8, 1.28)):
    #   r=1.5, A=1:  max(-1.5, -1.28) = -1.28  (clipped high)
    #   r=0.9, A=1:  max(-0.9, -0.9)  = -0.9
    #   r=0.5, A=-2: max(1.0, 1.6)    =  1.6   (clipped low)
    # token-mean over 3 tokens: (-1.28 - 0.9 + 1.6) / 3
    logp, old, adv, mask = hand_example()
    loss, m = clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-0.58 / 3, abs=1e-12)
    assert m["clip_frac"].item() == pytest.approx(2 / 3)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.9 + 0.5) / 3)
    # k3 estimate of KL(old || new) per token: r - 1 - log r
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.9, 0.5)) / 3
    assert m["approx_kl"].item() == pytest.approx(k3)
    # gradient: only the unclipped token (r=0.9) has one: d/dlogp (-A r / 3) = -0.9 / 3
    loss.backward()
    expected = torch.tensor([[0.0, -0.3], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, atol=1e-12)
    assert not any(v.requires_grad for v in m.values())


def test_aggregation_modes_by_hand():
    logp, old, adv, mask = hand_example()
    values = {
        "token-mean": -0.58 / 3,
        "seq-mean-token-mean": ((-1.28 - 0.9) / 2 + 1.6) / 2,
        "seq-mean-token-sum": (-1.28 - 0.9 + 1.6) / 2,
        "seq-mean-token-sum-norm": (-1.28 - 0.9 + 1.6) / (2 * 4),
    }
    for mode, expected in values.items():
        scale = LossScale.of(mask, max_tokens=4)
        loss, _ = clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, loss_agg=mode, scale=scale)
        assert loss.item() == pytest.approx(expected, abs=1e-12), mode


def test_on_policy_ratio_one_gives_plain_policy_gradient():
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    loss, m = clipped_policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-(adv.sum() * 4).item() / 12)
    assert torch.allclose(logp.grad, -adv[:, None].expand(3, 4) / 12)
    assert m["clip_frac"].item() == 0.0


def test_unknown_aggregation_lists_valid_modes():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean", LossScale(1, 1))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batch_split_gives_the_same_gradient(mode):
    """Splitting a mini-batch 1, 2 or 4 ways with accumulation leaves the gradient unchanged."""
    g = torch.Generator().manual_seed(0)
    b, t = 8, 6
    base = torch.randn(b, t, generator=g, dtype=torch.float64)
    old = base + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).double()
    scale = LossScale.of(mask, max_tokens=t)
    grads = []
    for parts in (1, 2, 4):
        logp = base.clone().requires_grad_(True)
        for rows in torch.arange(b).chunk(parts):
            # each micro-batch is cut to its own longest row, as the trainer's padding does
            width = int(lengths[rows].max())
            loss, _ = clipped_policy_loss(logp[rows, :width], old[rows, :width], adv[rows], mask[rows, :width],
                                          loss_agg=mode, scale=scale)
            loss.backward()
        grads.append(logp.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-14) and torch.allclose(grads[0], grads[2], atol=1e-14)


def test_dual_clip_caps_negative_advantage_loss():
    # A = -1, ratio 5: clipped PPO gives max(5, 1.2) = 5; dual clip c = 3 caps it at 3
    logp = torch.log(torch.tensor([[5.0, 0.5]], dtype=torch.float64))
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss, m = clipped_policy_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), mask, clip_low=0.2, clip_high=0.2,
                                  dual_clip_c=3.0, loss_agg="seq-mean-token-sum")
    # tokens: min(max(5, 1.2), 3) = 3 and max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx(3.8)
    with pytest.raises(ValueError, match="dual_clip_c"):
        clipped_policy_loss(logp, old, torch.tensor([-1.0]), mask, dual_clip_c=0.5)


def test_gspo_sequence_ratio_by_hand():
    # token log-ratios 0.2 and -0.1 (mask 1, 1): sequence ratio exp(0.05) for both tokens
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.2, -0.1, 7.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, m = clipped_policy_loss(logp, old, torch.tensor([2.0], dtype=torch.float64), mask, clip_low=0.2, clip_high=0.2,
                                  ratio_level="sequence", loss_agg="seq-mean-token-mean")
    s = math.exp(0.05)
    assert loss.item() == pytest.approx(-2 * s)
    assert m["ratio_mean"].item() == pytest.approx(s)
    loss.backward()
    # GSPO gradient: -A * s * (1 / |y|) for each real token, 0 on the masked one
    assert torch.allclose(logp.grad, torch.tensor([[-s, -s, 0.0]], dtype=torch.float64))


def test_reinforce_loss_by_hand():
    from grpo_lab.losses import reinforce_loss

    logp = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    loss, _ = reinforce_loss(logp, torch.tensor([1.0, -2.0], dtype=torch.float64), mask)
    # (-1 * -1 + -1 * -2 + 2 * -0.5) / 3 = (1 + 2 - 1) / 3
    assert loss.item() == pytest.approx(2 / 3)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]], dtype=torch.float64))


def test_kl_estimators_by_hand():
    from grpo_lab.losses import kl_penalty

    logp, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, -0.5]])
    # d = logp - ref = 0.5, -0.5
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([[0.5, -0.5]]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([[0.125, 0.125]]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(0.5) - 1 - 0.5]
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([k3]))
    assert kl_penalty(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), "k3").item() == 10.0  # clamped
    assert torch.allclose(kl_penalty(logp, ref, "abs"), torch.tensor([[0.5, 0.5]]))
    for name in ("k1", "k3", "abs"):  # straight-through: the value is the estimator's own
        assert torch.allclose(kl_penalty(logp, ref, name + "+"), kl_penalty(logp, ref, name))
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k4")


def test_truncated_is_weights_by_hand():
    from grpo_lab.losses import truncated_is_weights

    old = torch.log(torch.tensor([[0.5, 0.9, 0.3]]))
    rollout = torch.log(torch.tensor([[0.25, 0.9, 0.05]]))
    w, m = truncated_is_weights(old, rollout, torch.tensor([[1.0, 1.0, 0.0]]), cap=1.5)
    # ratios 2, 1, 6 -> truncated to 1.5, 1, 1.5; the third token is masked out of the metrics
    assert torch.allclose(w, torch.tensor([[1.5, 1.0, 1.5]]))
    assert m["tis_weight_mean"].item() == pytest.approx(1.25) and m["tis_frac_truncated"].item() == pytest.approx(0.5)
