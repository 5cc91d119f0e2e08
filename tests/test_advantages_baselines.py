"""The advantage estimators a verl user reaches for: REINFORCE++ (and its baseline
variant), OPO, GPG and pass@k. Hand-worked values, the plain loops of
``grpo_lab.advantages.reference`` (verl's definitions: a single-turn response repeated
over its tokens) on random batches, and multi-turn episodes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_lab.advantages import AdvantageInputs, run_estimator
from grpo_lab.advantages.reference import (gpg_loop, opo_loop, passk_loop, reinforce_pp_baseline_loop,
                                           reinforce_pp_loop)

NEW = ("reinforce_pp", "reinforce_pp_baseline", "opo", "gpg", "grpo_passk")


def single_turn(rewards, groups, lengths):
    n = len(rewards)
    return AdvantageInputs(rewards=torch.tensor(rewards, dtype=torch.float64), group_id=torch.tensor(groups),
                           traj_id=torch.arange(n), step=torch.zeros(n, dtype=torch.long),
                           lengths=torch.tensor(lengths, dtype=torch.float64))


#: two groups of three responses: rewards, and the tokens each trains
HAND = single_turn([1.0, 0.0, 0.5, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1, 1], [2, 4, 2, 1, 3, 4])


def test_opo_hand_worked():
    """Group 0: baseline (2*1 + 4*0 + 2*0.5) / 8 = 0.375; group 1: (1*0 + 3*1 + 4*1) / 8 = 0.875."""
    adv = run_estimator(HAND, "opo").advantages.tolist()
    assert adv == pytest.approx([0.625, -0.375, 0.125, -0.875, 0.125, 0.125], abs=1e-12)


def test_gpg_hand_worked():
    """4 of 6 rewards are non-zero: alpha = 6 / 4 = 1.5; group means 0.5 and 2/3."""
    out = run_estimator(HAND, "gpg")
    assert out.advantages.tolist() == pytest.approx([0.75, -0.75, 0.0, -1.0, 0.5, 0.5], abs=1e-12)
    assert out.metrics["gpg_alpha"] == 1.5
    halved = run_estimator(HAND, "gpg", {"f_norm": 2.0}).advantages
    assert torch.allclose(halved, out.advantages / 2)


def test_passk_hand_worked():
    """Group 0: best 1 beats 0.5 by 0.5; std of (1, 0, 0.5) is 0.5, so 0.5 / 0.5 = 1 (up to
    eps); group 1 ties for the best: 0 everywhere."""
    adv = run_estimator(HAND, "grpo_passk").advantages.tolist()
    assert adv == pytest.approx([0.5 / (0.5 + 1e-6), 0, 0, 0, 0, 0], abs=1e-12)
    raw = run_estimator(HAND, "grpo_passk", {"norm_adv_by_std": False}).advantages.tolist()
    assert raw == pytest.approx([0.5, 0, 0, 0, 0, 0], abs=1e-12)


def test_reinforce_pp_hand_worked():
    """16 tokens: mean (2*1 + 0 + 2*0.5 + 0 + 3 + 4) / 16 = 0.625; unbiased variance
    (2*0.375^2 + 4*0.625^2 + 2*0.125^2 + 0.625^2 + 3*0.375^2 + 4*0.375^2) / 15 = 3.25 / 15."""
    sd = math.sqrt(3.25 / 15 + 1e-8)
    expected = [(r - 0.625) / sd for r in [1.0, 0.0, 0.5, 0.0, 1.0, 1.0]]
    assert run_estimator(HAND, "reinforce_pp").advantages.tolist() == pytest.approx(expected, abs=1e-12)


def test_reinforce_pp_baseline_hand_worked():
    """Centred: (0.5, -0.5, 0, -2/3, 1/3, 1/3); token mean (1 - 2 + 0 - 2/3 + 1 + 4/3) / 16
    = 2/3 / 16; then the unbiased token variance around it."""
    centred = [0.5, -0.5, 0.0, -2 / 3, 1 / 3, 1 / 3]
    weights = [2, 4, 2, 1, 3, 4]
    mean = sum(w * c for w, c in zip(weights, centred)) / 16
    var = sum(w * (c - mean) ** 2 for w, c in zip(weights, centred)) / 15
    expected = [(c - mean) / math.sqrt(var + 1e-8) for c in centred]
    assert run_estimator(HAND, "reinforce_pp_baseline").advantages.tolist() == pytest.approx(expected, abs=1e-12)


@st.composite
def batches(draw):
    rewards, groups, lengths = [], [], []
    for g in range(draw(st.integers(1, 5))):
        for _ in range(draw(st.integers(1, 6))):
            rewards.append(draw(st.sampled_from([0.0, 1.0, 0.5, -0.25, 2.0])))
            groups.append(g)
            lengths.append(draw(st.integers(1, 9)))
    return rewards, groups, lengths


@settings(max_examples=80, deadline=None)
@given(batches())
def test_each_equals_its_plain_loop_on_single_turn_batches(data):
    rewards, groups, lengths = data
    inp = single_turn(rewards, groups, lengths)
    loops = {"reinforce_pp": reinforce_pp_loop(rewards, lengths),
             "reinforce_pp_baseline": reinforce_pp_baseline_loop(rewards, groups, lengths),
             "opo": opo_loop(rewards, groups, lengths), "gpg": gpg_loop(rewards, groups),
             "grpo_passk": passk_loop(rewards, groups)}
    for name, slow in loops.items():
        fast = run_estimator(inp, name).advantages
        assert torch.allclose(fast, torch.tensor(slow, dtype=torch.float64), atol=1e-9), name


@settings(max_examples=40, deadline=None)
@given(batches())
def test_groups_whose_returns_are_equal_give_zero_except_reinforce_pp(data):
    """No group baseline has a signal when a group's returns are equal; REINFORCE++ has no
    group baseline (the batch is its baseline) and is the exception."""
    _, groups, lengths = data
    inp = single_turn([0.5] * len(groups), groups, lengths)
    for name in NEW:
        out = run_estimator(inp, name)
        assert torch.equal(out.advantages, torch.zeros_like(out.advantages)), name
        assert out.metrics["frac_zero_std_groups"] == 1.0


def test_multi_turn_episodes_count_their_return_and_all_their_tokens():
    """Two groups of two episodes, of 2 and 1 turns: an episode's rows share one advantage
    (its return's), OPO weighs an episode by all its rows' tokens, and REINFORCE++ discounts
    over turns."""
    inp = AdvantageInputs(rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.5, 0.0], dtype=torch.float64), group_id=torch.tensor([0, 0, 0, 1, 1, 1]),
                          traj_id=torch.tensor([0, 0, 1, 2, 2, 3]), step=torch.tensor([0, 1, 0, 0, 1, 0]),
                          lengths=torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, 6.0]))
    opo = run_estimator(inp, "opo").advantages.tolist()
    # group 0: returns (1, 0), tokens (4, 2): baseline 4/6; group 1: returns (0.5, 0), tokens (2, 6): 1/8
    assert opo == pytest.approx([1 / 3, 1 / 3, -2 / 3, 0.375, 0.375, -0.125], abs=1e-12)
    for name in ("reinforce_pp_baseline", "gpg", "grpo_passk"):
        adv = run_estimator(inp, name).advantages
        assert adv[0] == adv[1] and adv[3] == adv[4], name
    returns = [0.9, 1.0, 0.0, 0.45, 0.5, 0.0]  # gamma 0.9 over turns
    lengths = [3, 1, 2, 1, 1, 6]
    expected = reinforce_pp_loop(returns, lengths)
    assert run_estimator(inp, "reinforce_pp", {"gamma": 0.9}).advantages.tolist() == pytest.approx(expected, abs=1e-9)


def test_a_row_penalty_and_missing_lengths_are_refused_by_name():
    with pytest.raises(ValueError, match="penalty_placement=episode"):
        run_estimator(AdvantageInputs(rewards=torch.zeros(2), group_id=torch.zeros(2, dtype=torch.long),
                                      traj_id=torch.arange(2), penalty=torch.zeros(2)), "gpg")
    with pytest.raises(ValueError, match="lengths"):
        run_estimator(AdvantageInputs(rewards=torch.zeros(2), group_id=torch.zeros(2, dtype=torch.long),
                                      traj_id=torch.arange(2)), "opo")
    with pytest.raises(ValueError, match="f_norm"):
        run_estimator(HAND, "gpg", {"f_norm": 0.0})


def test_the_pipeline_gives_them_the_batch_tokens_and_the_episode_placement():
    from grpo_lab.advantages import compute_advantages, default_penalty_placement
    from grpo_lab.data import RolloutBatch

    batch = RolloutBatch(group_id=[0, 0], traj_id=[0, 1], step=[0, 0], prompt_ids=[[1], [1]],
                         response_ids=[[2, 3, 4], [5]], rollout_logprobs=[[0.0] * 3, [0.0]],
                         loss_mask=[[1.0, 1.0, 0.0], [1.0]], reward=[1.0, 0.0], done=[True, True],
                         valid_action=[True, False], anchor=["a", "a"])
    assert all(default_penalty_placement(n) == "episode" for n in NEW)
    # tokens trained: 2 and 1 (the masked observation token does not count): baseline 2/3
    out = compute_advantages(batch, "opo", invalid_penalty=0.1)
    assert out.advantages.tolist() == pytest.approx([1 - (2 * 1 + 1 * -0.1) / 3, -0.1 - (2 * 1 + 1 * -0.1) / 3])
