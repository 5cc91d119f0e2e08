"""GiGPO, RLOO and focal scaling: hand-worked examples, invariants, and equality with the
plain loop references on random batches."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from grpo_lab.advantages import AdvantageInputs, example_inputs, get_modifier, run_estimator
from grpo_lab.advantages.focal import focal
from grpo_lab.advantages.gigpo import gigpo
from grpo_lab.advantages.grouping import discounted_returns
from grpo_lab.advantages.reference import focal_loop, gigpo_loop, grpo_loop, rloo_loop
from grpo_lab.advantages.rloo import rloo
from grpo_lab.data import anchor_ids


def make(rewards, groups, trajs, steps=None, anchors=None, success=None, penalty=None):
    n = len(rewards)
    steps = steps if steps is not None else [0] * n
    anchors = anchors if anchors is not None else list(range(n))
    return AdvantageInputs(
        rewards=torch.tensor(rewards, dtype=torch.float64),
        group_id=torch.tensor(groups),
        traj_id=torch.tensor(trajs),
        step=torch.tensor(steps),
        anchor_id=anchor_ids(anchors),
        anchors=anchors,
        success=torch.tensor(success if success is not None else [False] * n),
        penalty=torch.tensor(penalty, dtype=torch.float64) if penalty is not None else None,
    )


# Group 0: episode 0 = A (r 0) -> B (r 1, won); episode 1 = A (r 0) -> A (r 0) -> B (r 0).
# Group 1: episodes 2 and 3 each one step from an anchor also named A, reward 1.
GIGPO_EXAMPLE = dict(
    rewards=[0, 1, 0, 0, 0, 1, 1],
    groups=[0, 0, 0, 0, 0, 1, 1],
    trajs=[0, 0, 1, 1, 1, 2, 3],
    steps=[0, 1, 0, 1, 2, 0, 0],
    anchors=["A", "B", "A", "A", "B", "A", "A"],
)


def test_gigpo_hand_worked_mean_norm():
    # gamma 0.5: step returns  ep0: 0 + 0.5 * 1 = 0.5, 1;  ep1: 0, 0, 0;  ep2, ep3: 1
    # episode level (group 0): returns 1, 0 -> +0.5, -0.5; group 1: all equal -> 0
    # step groups in group 0: A = {0.5, 0, 0} (mean 1/6) -> 1/3, -1/6, -1/6; B = {1, 0} -> 0.5, -0.5
    # step group A of group 1 is separate from group 0's A: {1, 1} -> 0, 0
    out = gigpo(make(**GIGPO_EXAMPLE), gamma=0.5, mode="mean_norm")
    expected = [0.5 + 1 / 3, 0.5 + 0.5, -0.5 - 1 / 6, -0.5 - 1 / 6, -0.5 - 0.5, 0.0, 0.0]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert out.metrics["frac_zero_std_groups"] == 0.5
    # step groups: (0, A) x3, (0, B) x2, (1, A) x2
    assert out.metrics["step_group_size_mean"] == pytest.approx(7 / 3)


def test_gigpo_hand_worked_mean_std_norm_and_step_weight():
    # episode: returns 1, 0: std sqrt(0.5) -> +-0.5 / sqrt(0.5); A: {0.5, 0, 0}: std sqrt(1/12);
    # B: {1, 0}: std sqrt(0.5)
    out = gigpo(make(**GIGPO_EXAMPLE), gamma=0.5, mode="mean_std_norm", step_weight=0.5, eps=0.0)
    e, a, b = 0.5 / math.sqrt(0.5), math.sqrt(1 / 12), 0.5 / math.sqrt(0.5)
    expected = [e + 0.5 * (1 / 3) / a, e + 0.5 * b, -e - 0.5 * (1 / 6) / a, -e - 0.5 * (1 / 6) / a, -e - 0.5 * b, 0, 0]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_gigpo_episode_stats_over_steps_weighs_long_episodes():
    # over step rows, group 0 has returns 1, 1 (ep0) and 0, 0, 0 (ep1): mean 0.4
    out = gigpo(make(**GIGPO_EXAMPLE), gamma=0.5, episode_stats="step", step_weight=0.0)
    assert torch.allclose(out.advantages, torch.tensor([0.6, 0.6, -0.4, -0.4, -0.4, 0, 0], dtype=torch.float64))


def test_gigpo_singleton_step_groups_get_zero_step_advantage():
    ex = dict(GIGPO_EXAMPLE, anchors=["A", "B", "C", "D", "E", "F", "G"])
    out = gigpo(make(**ex), gamma=0.5, step_weight=1.0)
    episode_only = gigpo(make(**ex), gamma=0.5, step_weight=0.0)
    assert torch.equal(out.advantages, episode_only.advantages)
    assert out.metrics["frac_singleton_step_groups"] == 1.0
    assert out.metrics["frac_rows_in_shared_step_groups"] == 0.0


def test_gigpo_repetition_statistics_count_groups_and_rows():
    # group 0: A at rows 0 and 2, B, C, D alone; group 1: A and E alone (the A of
    # another episode group is another step group). 6 step groups, 5 of them singletons;
    # 2 of 7 rows share their step group.
    ex = dict(GIGPO_EXAMPLE, anchors=["A", "B", "A", "C", "D", "A", "E"])
    out = gigpo(make(**ex), gamma=0.5)
    assert out.metrics["frac_singleton_step_groups"] == pytest.approx(5 / 6)
    assert out.metrics["frac_rows_in_shared_step_groups"] == pytest.approx(2 / 7)
    assert out.metrics["step_group_size_mean"] == pytest.approx(7 / 6)


def test_gigpo_similarity_merges_near_identical_anchors():
    texts = ["you are at row 1, column 2", "you are at row 1, column 3", "a completely different room"]
    ex = dict(GIGPO_EXAMPLE, anchors=[texts[0], texts[2], texts[1], texts[0], texts[2], "x", "x"])
    merged = gigpo(make(**ex), gamma=0.5, similarity_threshold=0.9)
    exact = gigpo(make(**dict(ex, anchors=[texts[0], texts[2], texts[0], texts[0], texts[2], "x", "x"])), gamma=0.5)
    assert torch.allclose(merged.advantages, exact.advantages)
    separate = gigpo(make(**ex), gamma=0.5)
    assert not torch.allclose(separate.advantages, exact.advantages)


def test_gigpo_rejects_bad_parameters():
    with pytest.raises(ValueError, match="episode_stats"):
        gigpo(make(**GIGPO_EXAMPLE), episode_stats="rows")
    with pytest.raises(ValueError, match="gamma"):
        gigpo(make(**GIGPO_EXAMPLE), gamma=1.5)
    with pytest.raises(ValueError, match="mode"):
        gigpo(make(**GIGPO_EXAMPLE), mode="zscore")
    with pytest.raises(ValueError, match="steps"):
        gigpo(make(**dict(GIGPO_EXAMPLE, steps=[0, 2, 0, 1, 2, 0, 0])))


def test_discounted_returns_by_hand_in_any_row_order():
    # episode 4: rewards 1, 0, 2 -> G = 1 + 0.5 * (0 + 0.5 * 2) = 1.5, 1, 2; episode 9: 3
    rewards = torch.tensor([2.0, 3.0, 1.0, 0.0])
    out = discounted_returns(rewards, torch.tensor([4, 9, 4, 4]), torch.tensor([2, 0, 0, 1]), 0.5)
    assert out.tolist() == [2.0, 3.0, 1.5, 1.0]


def test_rloo_hand_worked():
    # returns 1, 0, 0, 1: baseline of each = mean of the other three
    out = rloo(make([1, 0, 0, 1, 5], [0, 0, 0, 0, 1], [0, 1, 2, 3, 4]))
    assert torch.allclose(out.advantages, torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3, 0.0], dtype=torch.float64))


def test_focal_hand_worked():
    # group 0: 1 of 4 episodes won -> scale (3/4)^2; group 1: 2 of 2 won -> 0
    inp = make([0] * 6, [0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 4, 5], success=[True, False, False, False, True, True])
    out = focal(torch.ones(6, dtype=torch.float64), inp, gamma=2.0)
    assert out.advantages.tolist() == [0.5625] * 4 + [0.0, 0.0]
    assert focal(torch.ones(6, 3), inp, gamma=0.0).advantages.tolist() == torch.ones(6, 3).tolist()


def test_modifiers_compose_after_any_estimator():
    inp = example_inputs()
    plain = run_estimator(inp, "gigpo")
    scaled = run_estimator(inp, "gigpo", modifiers={"focal": {"gamma": 1.0}})
    # each group of example_inputs wins 1 of 2 episodes: scale 0.5
    assert torch.allclose(scaled.advantages, plain.advantages * 0.5)
    assert "focal_scale_mean" in scaled.metrics


def test_unknown_modifier_lists_names():
    with pytest.raises(KeyError, match="focal"):
        get_modifier("focus")


# ---------------------------------------------------------------- random batches vs loops
@st.composite
def episodes(draw, max_groups=4, max_group=5, max_len=4):
    rewards, groups, trajs, steps, anchors, success, penalty = [], [], [], [], [], [], []
    traj = 0
    for g in range(draw(st.integers(1, max_groups))):
        for _ in range(draw(st.integers(1, max_group))):
            length = draw(st.integers(1, max_len))
            for s in range(length):
                rewards.append(draw(st.sampled_from([0.0, 1.0, -0.1, 0.5])))
                groups.append(g)
                trajs.append(traj)
                steps.append(s)
                anchors.append(f"state {draw(st.integers(0, 3))}")
                success.append(s == length - 1 and draw(st.booleans()))
                penalty.append(draw(st.sampled_from([0.0, 0.0, 0.1])))
            traj += 1
    perm = draw(st.permutations(range(len(rewards))))
    pick = lambda xs: [xs[i] for i in perm]  # noqa: E731  (rows in any order)
    return tuple(map(pick, (rewards, groups, trajs, steps, anchors, success, penalty)))


@settings(max_examples=80, deadline=None)
@given(episodes(), st.sampled_from(["mean_norm", "mean_std_norm"]), st.sampled_from(["trajectory", "step"]),
       st.sampled_from([1.0, 0.95, 0.0]), st.sampled_from([1.0, 0.8]), st.booleans())
def test_gigpo_equals_loop_reference(data, mode, episode_stats, gamma, threshold, with_penalty):
    rewards, groups, trajs, steps, anchors, success, penalty = data
    penalty = penalty if with_penalty else None
    fast = gigpo(make(rewards, groups, trajs, steps, anchors, penalty=penalty), gamma=gamma, mode=mode,
                 episode_stats=episode_stats, similarity_threshold=threshold).advantages
    slow = gigpo_loop(rewards, groups, trajs, steps, anchors, gamma=gamma, mode=mode, episode_stats=episode_stats,
                      similarity_threshold=threshold, penalty=penalty)
    assert torch.allclose(fast, torch.tensor(slow, dtype=torch.float64), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(episodes(), st.sampled_from(["group", "batch", "none"]), st.booleans())
def test_grpo_rloo_focal_equal_loop_references(data, scale, with_penalty):
    rewards, groups, trajs, steps, anchors, success, penalty = data
    penalty = penalty if with_penalty else None
    inp = make(rewards, groups, trajs, steps, anchors, success, penalty)
    grpo_adv = run_estimator(inp, "grpo", {"scale_rewards": scale}).advantages
    slow = grpo_loop(rewards, groups, trajs, scale, penalty=penalty)
    assert torch.allclose(grpo_adv, torch.tensor(slow, dtype=torch.float64), atol=1e-9)
    rloo_adv = run_estimator(inp, "rloo").advantages
    assert torch.allclose(rloo_adv, torch.tensor(rloo_loop(rewards, groups, trajs, penalty), dtype=torch.float64), atol=1e-9)
    scaled = focal(rloo_adv, inp, gamma=1.5).advantages
    assert torch.allclose(scaled, torch.tensor(focal_loop(rloo_adv.tolist(), groups, trajs, success, 1.5), dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(episodes(), st.floats(-5, 5), st.floats(0.1, 10))
def test_gigpo_mean_std_norm_is_shift_and_scale_invariant(data, shift, scale):
    """Shifting every reward leaves episode advantages unchanged; with gamma = 1 the
    step returns shift by a step-dependent amount, so only scaling is checked there."""
    rewards, groups, trajs, steps, anchors, _, _ = data
    base = gigpo(make(rewards, groups, trajs, steps, anchors), mode="mean_std_norm", eps=0.0).advantages
    scaled = gigpo(make([r * scale for r in rewards], groups, trajs, steps, anchors), mode="mean_std_norm", eps=0.0).advantages
    assert torch.allclose(base, scaled, atol=1e-6)
    # eps > 0: returns equal in exact arithmetic may differ by rounding once shifted, and a
    # std of 1e-17 must not be blown up to +-1 (mean and std are shift-invariant for any eps)
    ep = lambda rs: gigpo(make(rs, groups, trajs, steps, anchors), mode="mean_std_norm", eps=1e-6, step_weight=0.0).advantages  # noqa: E731
    # a constant added to each *episode* (here: to its first step) shifts all returns of a group equally
    shifted = [r + shift if s == 0 else r for r, s in zip(rewards, steps)]
    assert torch.allclose(ep(rewards), ep(shifted), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(episodes())
def test_equal_reward_groups_give_zero_for_every_estimator(data):
    _, groups, trajs, steps, anchors, success, _ = data
    # one-step episodes with equal rewards: no signal anywhere
    inp = make([0.5] * len(groups), groups, list(range(len(groups))), [0] * len(groups), anchors, success)
    for name in ("grpo", "rloo", "gigpo"):
        out = run_estimator(inp, name)
        assert torch.equal(out.advantages, torch.zeros_like(out.advantages)), name
        assert out.metrics["frac_zero_std_groups"] == 1.0


def test_random_large_batch_matches_loop():
    rnd = random.Random(0)
    rows = []
    for g in range(30):
        for m in range(8):
            length = rnd.randint(1, 15)
            for s in range(length):
                rows.append((rnd.choice([0.0, 1.0]) if s == length - 1 else 0.0, g, g * 8 + m, s, (g % 3, rnd.randint(0, 5))))
    rewards, groups, trajs, steps, anchors = map(list, zip(*rows))
    fast = gigpo(make(rewards, groups, trajs, steps, anchors)).advantages
    slow = gigpo_loop(rewards, groups, trajs, steps, anchors)
    assert torch.allclose(fast, torch.tensor(slow, dtype=torch.float64), atol=1e-9)


def test_std_that_underflows_gives_zero_not_nan():
    """Returns that differ by less than a representable std (here 3e-232) are no signal."""
    tiny = 3.22204863260771e-232
    inp = make([tiny, 0.0, tiny], [0, 0, 1], [0, 1, 2], [0, 0, 0], ["a", "b", "c"])
    for name in ("gigpo", "grpo"):
        params = {"mode": "mean_std_norm", "eps": 0.0} if name == "gigpo" else {"eps": 0.0}
        out = run_estimator(inp, name, params).advantages
        assert torch.equal(out, torch.zeros(3, dtype=torch.float64)), name
