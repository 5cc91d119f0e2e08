"""COPO: a hand-worked global stream and blending weights, and the blended loss."""

import math

import pytest
import torch

from grpo_lab.advantages import AdvantageInputs, run_estimator
from grpo_lab.advantages.copo import copo
from grpo_lab.losses import LossScale, clipped_policy_loss


def three_groups():
    # group 0: returns 1, 1, 1, 1; group 1: 1, 0, 0, 0; group 2: 0, 0, 0, 0 (one row per episode)
    rewards = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    return AdvantageInputs(rewards=torch.tensor(rewards, dtype=torch.float64),
                           group_id=torch.arange(12) // 4, traj_id=torch.arange(12))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_copo_hand_worked():
    out = copo(three_groups(), eps=0.0)
    # entropies (base 2): group 0 and 2 have one outcome: H = 0; group 1: p = 1/4, 3/4
    h1 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    lam = (1 - 1 / 4) / math.log2(4)
    r_global = [1.0, 0.25 * (1 - lam * h1), 0.0]
    mean = sum(r_global) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in r_global) / 2)
    a_global = [(r - mean) / std for r in r_global]
    expected_global = torch.tensor([a for a in a_global for _ in range(4)], dtype=torch.float64)
    assert torch.allclose(out.extras["global_advantages"], expected_global, atol=1e-12)
    # local: GRPO, only group 1 has signal: (1 - 0.25) / std(1, 0, 0, 0) = 0.75 / 0.5 = 1.5; -0.5
    assert torch.allclose(out.advantages, torch.tensor([0] * 4 + [1.5, -0.5, -0.5, -0.5] + [0] * 4, dtype=torch.float64))
    # soft_forced: groups without local signal put all weight on the global loss
    w1 = sigmoid(h1 - 0.5)
    assert torch.allclose(out.extras["local_weight"], torch.tensor([0] * 4 + [w1] * 4 + [0] * 4, dtype=torch.float64))
    soft = copo(three_groups(), blend="soft", eps=0.0)
    w0 = sigmoid(-0.5)
    assert torch.allclose(soft.extras["local_weight"], torch.tensor([w0] * 4 + [w1] * 4 + [w0] * 4, dtype=torch.float64))


def test_copo_without_entropy_coefficient_uses_group_means():
    out = copo(three_groups(), entropy_coef=False, eps=0.0)
    r_global = [1.0, 0.25, 0.0]
    mean = sum(r_global) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in r_global) / 2)
    assert out.extras["global_advantages"][0].item() == pytest.approx((1.0 - mean) / std)


def test_copo_rejects_bad_blend():
    with pytest.raises(ValueError, match="blend"):
        copo(three_groups(), blend="hard")


def test_blended_loss_is_the_weighted_sum_of_two_clipped_losses():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 3, generator=g, dtype=torch.float64)
    old = logp + 0.4 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.float64)
    local, glob = torch.tensor([1.0, -1.0, 0.0, 0.5], dtype=torch.float64), torch.tensor([0.3, 0.3, -2.0, 1.0], dtype=torch.float64)
    w = torch.tensor([0.2, 1.0, 0.0, 0.5], dtype=torch.float64)
    scale = LossScale.of(mask)
    blended, _ = clipped_policy_loss(logp, old, local, mask, global_advantages=glob, local_weight=w, scale=scale,
                                     loss_agg="seq-mean-token-sum")
    expected = 0.0
    for i in range(4):
        li, _ = clipped_policy_loss(logp[i:i + 1], old[i:i + 1], local[i:i + 1], mask[i:i + 1], scale=scale, loss_agg="seq-mean-token-sum")
        gi, _ = clipped_policy_loss(logp[i:i + 1], old[i:i + 1], glob[i:i + 1], mask[i:i + 1], scale=scale, loss_agg="seq-mean-token-sum")
        expected += w[i] * li + (1 - w[i]) * gi
    assert blended.item() == pytest.approx(float(expected), abs=1e-12)
    with pytest.raises(ValueError, match="together"):
        clipped_policy_loss(logp, old, local, mask, global_advantages=glob)


def test_modifiers_leave_the_global_stream_alone():
    inp = three_groups()
    inp = AdvantageInputs(rewards=inp.rewards, group_id=inp.group_id, traj_id=inp.traj_id, success=inp.rewards > 0)
    plain = run_estimator(inp, "copo")
    focal = run_estimator(inp, "copo", modifiers={"focal": {"gamma": 1.0}})
    assert torch.equal(plain.extras["global_advantages"], focal.extras["global_advantages"])
    assert torch.allclose(focal.advantages, plain.advantages * 0.75)  # group 1: 1 of 4 won


from hypothesis import given, settings, strategies as st  # noqa: E402

from grpo_lab.advantages.reference import copo_loop  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=1, max_size=6), min_size=1, max_size=5),
       st.sampled_from(["soft", "soft_forced"]), st.booleans(), st.booleans())
def test_copo_equals_loop_reference(groups, blend, entropy_coef, with_penalty):
    rewards = [r for g in groups for r in g]
    group_id = [i for i, g in enumerate(groups) for _ in g]
    traj_id = list(range(len(rewards)))
    penalty = [0.1 * (i % 2) for i in range(len(rewards))] if with_penalty else None
    inp = AdvantageInputs(rewards=torch.tensor(rewards, dtype=torch.float64), group_id=torch.tensor(group_id),
                          traj_id=torch.tensor(traj_id),
                          penalty=torch.tensor(penalty, dtype=torch.float64) if with_penalty else None)
    out = copo(inp, blend=blend, entropy_coef=entropy_coef)
    local, glob, weight = copo_loop(rewards, group_id, traj_id, blend=blend, entropy_coef=entropy_coef, penalty=penalty)
    assert torch.allclose(out.advantages, torch.tensor(local, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(out.extras["global_advantages"], torch.tensor(glob, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(out.extras["local_weight"], torch.tensor(weight, dtype=torch.float64), atol=1e-12)
