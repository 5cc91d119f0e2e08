"""Where the invalid-action penalty lands (``algo.penalty_placement``): hand-worked GiGPO
in both placements (``row`` is verl-agent's: each row pays on its own episode score and
step return), and the batch-to-inputs conversion."""

from __future__ import annotations

import pytest
import torch

from grpo_lab.advantages import AdvantageInputs, compute_advantages, inputs_from_batch, run_estimator
from grpo_lab.advantages.gigpo import gigpo
from grpo_lab.data import RolloutBatch, anchor_ids

# Group 0. Episode 0: A (valid, r 0) -> B (INVALID, r 0) -> C (valid, r 1).
#          Episode 1: A (valid, r 0) -> D (valid, r 0).
REWARDS = [0.0, 0.0, 1.0, 0.0, 0.0]
VALID = [True, False, True, True, True]
ANCHORS = ["A", "B", "C", "A", "D"]
COLUMNS = dict(group_id=[0] * 5, traj_id=[0, 0, 0, 1, 1], step=[0, 1, 2, 0, 1])


def inputs(rewards, penalty=None):
    return AdvantageInputs(rewards=torch.tensor(rewards, dtype=torch.float64),
                           group_id=torch.tensor(COLUMNS["group_id"]), traj_id=torch.tensor(COLUMNS["traj_id"]),
                           step=torch.tensor(COLUMNS["step"]), anchor_id=anchor_ids(ANCHORS), anchors=ANCHORS,
                           penalty=None if penalty is None else torch.tensor(penalty, dtype=torch.float64))


def test_gigpo_row_placement_by_hand():
    """verl-agent's placement with its statistics over step rows, gamma 1, mean_norm:
    row scores 1, 0.9, 1, 0, 0 (the invalid row pays 0.1), mean 0.58 -> episode part
    0.42, 0.32, 0.42, -0.58, -0.58. Step returns 1, 1 - 0.1, 1, 0, 0; step groups:
    A = {row 0: 1, row 3: 0} -> +-0.5, B, C, D alone -> 0."""
    out = gigpo(inputs(REWARDS, [0, 0.1, 0, 0, 0]), gamma=1.0, mode="mean_norm", episode_stats="step")
    expected = [0.42 + 0.5, 0.32, 0.42, -0.58 - 0.5, -0.58]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_gigpo_episode_placement_by_hand():
    """The penalty in the rewards: episode 0's return is 0.9 on all its rows (mean 0.54
    over rows -> 0.36 x3, -0.54 x2); step returns 0.9, 0.9, 1, 0, 0; A = {0.9, 0} -> +-0.45."""
    rewards = [r - (0.0 if v else 0.1) for r, v in zip(REWARDS, VALID)]
    out = gigpo(inputs(rewards), gamma=1.0, mode="mean_norm", episode_stats="step")
    expected = [0.36 + 0.45, 0.36, 0.36, -0.54 - 0.45, -0.54]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_row_penalty_touches_only_its_own_row_in_grpo():
    """Trajectory statistics, one invalid step in a winning episode: only that row drops
    below its episode's other rows, by the penalty over the group std."""
    clean = run_estimator(inputs(REWARDS), "grpo", {"eps": 0.0}).advantages
    paid = run_estimator(inputs(REWARDS, [0, 0.1, 0, 0, 0]), "grpo", {"eps": 0.0}).advantages
    assert paid[0] == paid[2] and paid[1] < paid[0] and paid[3] == paid[4]
    # the other episode's rows barely move (the penalty shifts the group mean by 0.1 / 3 / 2)
    assert torch.allclose(paid[3:], clean[3:], atol=0.05)


def batch():
    n = len(REWARDS)
    return RolloutBatch(prompt_ids=[[1]] * n, response_ids=[[2]] * n, rollout_logprobs=[[0.0]] * n,
                        loss_mask=[[1.0]] * n, reward=REWARDS, done=[False, False, True, False, True],
                        valid_action=VALID, anchor=ANCHORS, **COLUMNS)


def test_inputs_from_batch_places_the_penalty():
    row = inputs_from_batch(batch(), 0.1, "row")
    assert torch.equal(row.rewards, torch.tensor(REWARDS))
    assert torch.allclose(row.penalty, torch.tensor([0, 0.1, 0, 0, 0], dtype=torch.float64))
    episode = inputs_from_batch(batch(), 0.1, "episode")
    assert episode.penalty is None
    assert torch.allclose(episode.rewards, torch.tensor([0.0, -0.1, 1.0, 0.0, 0.0]))
    assert inputs_from_batch(batch(), 0.0, "row").penalty is None
    with pytest.raises(ValueError, match="'row', 'episode'.*'rows'"):
        inputs_from_batch(batch(), 0.1, "rows")
    # the two placements give different advantages, and the default is row
    a = compute_advantages(batch(), "gigpo", 0.1, penalty_placement="row").advantages
    b = compute_advantages(batch(), "gigpo", 0.1, penalty_placement="episode").advantages
    assert not torch.allclose(a, b)
    assert torch.equal(compute_advantages(batch(), "gigpo", 0.1).advantages, a)
    # tree_grpo's default is episode (it refuses a row penalty)
    assert torch.equal(compute_advantages(batch(), "tree_grpo", 0.1).advantages,
                       compute_advantages(batch(), "tree_grpo", 0.1, penalty_placement="episode").advantages)
    with pytest.raises(ValueError, match="penalty_placement=episode"):
        compute_advantages(batch(), "tree_grpo", 0.1, penalty_placement="row")


def test_bad_penalty_is_refused():
    with pytest.raises(ValueError, match="penalty must be finite and >= 0.*\\[1\\]"):
        inputs(REWARDS, [0, -0.1, 0, 0, 0])


def test_copo_global_stream_pays_the_row_penalty():
    """Three one-step groups; group 0 wins both episodes but both were invalid. Under row
    placement its local advantages are zero (equal scores), so it trains on the global
    stream alone, which must see the penalty as the episode placement does."""
    def inp(rewards, penalty=None):
        return AdvantageInputs(rewards=torch.tensor(rewards, dtype=torch.float64), group_id=torch.tensor([0, 0, 1, 1, 2, 2]),
                               traj_id=torch.arange(6),
                               penalty=None if penalty is None else torch.tensor(penalty, dtype=torch.float64))
    rewards, paid = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0, 0, 0, 0]
    row = run_estimator(inp(rewards, paid), "copo").extras["global_advantages"]
    episode = run_estimator(inp([r - p for r, p in zip(rewards, paid)]), "copo").extras["global_advantages"]
    unpaid = run_estimator(inp(rewards), "copo").extras["global_advantages"]
    assert torch.allclose(row, episode) and not torch.allclose(row, unpaid)
