"""RolloutBatch: column checks, selection and concatenation."""

import pytest
import torch

from grpo_lab.data import RolloutBatch, anchor_ids


def make(n=3, **over):
    cols = dict(
        group_id=[0] * n, traj_id=list(range(n)), step=[0] * n,
        prompt_ids=[torch.tensor([1, 2])] * n, response_ids=[torch.tensor([3, 4, 5])] * n,
        rollout_logprobs=[torch.zeros(3)] * n, loss_mask=[torch.ones(3)] * n,
        reward=[float(i) for i in range(n)], done=[True] * n, valid_action=[True] * n, anchor=list("abc"[:n]),
    )
    cols.update(over)
    return RolloutBatch(**cols)


def test_defaults_and_counts():
    b = make()
    assert len(b) == 3 and b.tree_id.tolist() == [-1, -1, -1] and b.won.tolist() == [False] * 3
    assert b.num_response_tokens() == 9


def test_mismatched_column_is_named():
    with pytest.raises(ValueError, match="reward"):
        make(reward=[0.0, 1.0])
    with pytest.raises(ValueError, match="row 1"):
        make(loss_mask=[torch.ones(3), torch.ones(2), torch.ones(3)])


def test_non_finite_reward_is_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        make(reward=[0.0, float("nan"), 1.0])


def test_select_and_concat_round_trip():
    b = make()
    picked = b.select([2, 0])
    assert picked.reward.tolist() == [2.0, 0.0] and picked.anchor == ["c", "a"]
    both = RolloutBatch.concat([picked, b.select([1])])
    assert both.traj_id.tolist() == [2, 0, 1]


def test_policy_versions_default_unknown_travel_with_their_rows_and_old_pickles_load():
    """``policy_version`` is -1 (not reported) unless given, follows select and concat, and
    a batch pickled before the column existed (a checkpoint's rollouts) loads with -1."""
    import pickle

    b = make(policy_version=[4, 5, 6])
    assert make().policy_version.tolist() == [-1, -1, -1]
    assert RolloutBatch.concat([b.select([2, 0]), make(n=1)]).policy_version.tolist() == [6, 4, -1]
    old = make()
    del old.__dict__["policy_version"]
    restored = pickle.loads(pickle.dumps(old))
    assert restored.policy_version.tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="policy_version"):
        make(policy_version=[1, 2])


def test_trajectory_returns_and_success():
    b = make(traj_id=[5, 5, 9], reward=[0.0, 1.0, 0.5], won=[False, True, False])
    assert b.trajectory_returns().tolist() == [1.0, 0.5]
    assert b.trajectory_success().tolist() == [True, False]


def test_anchor_ids_are_equal_iff_anchors_are_equal():
    ids = anchor_ids([("g", 1, 2), "x", ("g", 1, 2), ("g", 2, 1)])
    assert ids.tolist() == [0, 1, 0, 2]


def test_anchor_ids_hash_arrays_tensors_and_dicts_exactly():
    import numpy as np

    anchors = [
        np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 5]]),
        np.array([1, 2, 3, 4]),  # same bytes, other shape: a different state
        {"room": "kitchen", "items": ["key"]}, {"items": ["key"], "room": "kitchen"},
        torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), torch.tensor([1, 2]),
    ]
    assert anchor_ids(anchors).tolist() == [0, 0, 1, 2, 3, 3, 4, 4, 5]
