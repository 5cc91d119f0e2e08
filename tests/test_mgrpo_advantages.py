"""M-GRPO's hierarchical advantages by hand: the main agent's GRPO over a task's
episodes, each sub-agent's over its invocations aligned to d_max (duplicate and drop
cases), credit from the main return plus the sub-task reward; a single-role batch is
GRPO; bad role/invocation columns are named."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.advantages import AdvantageInputs, get_estimator

mgrpo = get_estimator("mgrpo")
grpo = get_estimator("grpo")


def two_episodes(sub_rewards_1=(0.0, 0.0, 0.0)):
    """One task, K = 2 episodes: main returns 1 and 0; the executor (role 1) is invoked
    once in episode 0 (own reward 0.2) and three times in episode 1."""
    return AdvantageInputs(
        rewards=torch.tensor([1.0, 0.0, 0.2, *sub_rewards_1], dtype=torch.float64),
        group_id=torch.zeros(6, dtype=torch.long), traj_id=torch.tensor([0, 1, 0, 1, 1, 1]),
        role=torch.tensor([0, 0, 1, 1, 1, 1]), invocation=torch.tensor([-1, -1, 0, 0, 1, 2]))


def test_alignment_duplicates_and_drops_to_d_max():
    """d_max = 2. Main: returns (1, 0): mean 0.5, std sqrt(0.5): +-0.7071. Executor: episode
    0's one unit (score 1 + 0.2) counts twice, episode 1 keeps 2 of its 3 (scores 0): over 4
    units mean 0.6, std sqrt(4 * 0.36 / 3); the duplicate's rows train twice (x2), the
    dropped unit's rows get 0."""
    out = mgrpo(two_episodes(), d_max=2)
    adv = out.advantages.tolist()
    std = math.sqrt(4 * 0.36 / 3)
    assert adv[:2] == pytest.approx([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)], abs=1e-5)
    assert adv[2] == pytest.approx(2 * 0.6 / std, abs=1e-5)
    assert sorted(adv[3:]) == pytest.approx([-0.6 / std, -0.6 / std, 0.0], abs=1e-5)
    assert out.metrics["mgrpo_units_duplicated"] == 1 and out.metrics["mgrpo_units_dropped"] == 1


def test_without_d_max_nothing_is_dropped_and_the_sub_task_reward_counts():
    """D = 3 (the most): episode 0's unit counts 3 times (score 1.2), episode 1's three
    units score 0 + (0.3, 0, 0). Weighted over 6: mean (3.6 + 0.3) / 6 = 0.65."""
    out = mgrpo(two_episodes((0.3, 0.0, 0.0)))
    scores = torch.tensor([1.2, 0.3, 0.0, 0.0], dtype=torch.float64)
    weights = torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    mean = float((weights * scores).sum() / 6)
    std = math.sqrt(float((weights * (scores - mean) ** 2).sum() / 5))
    assert mean == pytest.approx(0.65)
    expected = [3 * (1.2 - mean) / std, (0.3 - mean) / std, -mean / std, -mean / std]
    assert out.advantages[2:].tolist() == pytest.approx(expected, abs=1e-5)
    assert out.metrics["mgrpo_units_dropped"] == 0 and out.metrics["mgrpo_units_duplicated"] == 2


def test_the_choice_is_deterministic_and_seeded():
    a = mgrpo(two_episodes((0.1, 0.2, 0.3)), d_max=2).advantages
    assert torch.equal(a, mgrpo(two_episodes((0.1, 0.2, 0.3)), d_max=2).advantages)
    dropped = {int(torch.nonzero(mgrpo(two_episodes((0.1, 0.2, 0.3)), d_max=2, seed=s).advantages[3:] == 0)[0])
               for s in range(12)}
    assert len(dropped) > 1  # the dropped invocation is drawn, not always the same one


def test_a_single_role_batch_is_grpo():
    g = torch.Generator().manual_seed(0)
    inputs = AdvantageInputs(rewards=torch.randint(0, 2, (24,), generator=g).double(),
                             group_id=torch.arange(24) // 6, traj_id=torch.arange(24) // 2,
                             step=torch.arange(24) % 2)
    assert torch.allclose(mgrpo(inputs).advantages, grpo(inputs).advantages, atol=1e-12)


def test_bad_columns_are_named():
    bad = AdvantageInputs(rewards=torch.zeros(2), group_id=torch.zeros(2, dtype=torch.long), traj_id=torch.tensor([0, 1]),
                          role=torch.tensor([0, 1]), invocation=torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="row 1.*role 1, invocation -1"):
        mgrpo(bad)
    with pytest.raises(ValueError, match="d_max"):
        mgrpo(two_episodes(), d_max=0)
    negative = AdvantageInputs(rewards=torch.zeros(2), group_id=torch.zeros(2, dtype=torch.long),
                               traj_id=torch.tensor([0, 1]), role=torch.tensor([0, -1]), invocation=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="role -1"):
        mgrpo(negative)
    spanning = AdvantageInputs(rewards=torch.zeros(3), group_id=torch.tensor([0, 1, 1]), traj_id=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="more than one group"):
        mgrpo(spanning)
