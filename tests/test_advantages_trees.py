"""Tree-GRPO and TreeRPO: a hand-worked tree, tree bookkeeping errors, equality with the
loop references on random trees, and the chain special cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from grpo_lab.advantages import AdvantageInputs, run_estimator
from grpo_lab.advantages.reference import tree_grpo_loop, treerpo_loop
from grpo_lab.advantages.tree_grpo import tree_grpo
from grpo_lab.advantages.treerpo import treerpo
from grpo_lab.advantages.trees import tree_index


def tree_inputs(rewards, groups, trees, nodes, parents, penalty=None):
    n = len(rewards)
    return AdvantageInputs(
        rewards=torch.tensor(rewards, dtype=torch.float64), group_id=torch.tensor(groups),
        traj_id=torch.tensor(trees), step=torch.zeros(n, dtype=torch.long),
        tree_id=torch.tensor(trees), node_id=torch.tensor(nodes), parent_id=torch.tensor(parents),
        penalty=torch.tensor(penalty, dtype=torch.float64) if penalty is not None else None,
    )


# One prompt, two trees.  Tree 0: a -> {b, c}, b -> {d, e}; leaves d (1), e (0), c (1).
# Tree 1: f -> g; leaf g (0).            rows:  a  b  c  d  e  f  g
EXAMPLE = dict(rewards=[0, 0, 1, 1, 0, 0, 0], groups=[0] * 7, trees=[0, 0, 0, 0, 0, 1, 1],
               nodes=[0, 1, 2, 3, 4, 0, 1], parents=[-1, 0, 0, 1, 1, -1, 0])


def test_treerpo_hand_worked():
    # values: d 1, e 0, c 1, b = mean(d, e) = 0.5, a = mean(d, e, c) = 2/3, f = g = 0
    # sibling groups: {a, f} (the prompt's children), {b, c}, {d, e}, {g}
    # mean_norm: a 1/3, f -1/3, b -0.25, c 0.25, d 0.5, e -0.5
    out = treerpo(tree_inputs(**EXAMPLE), mode="mean_norm")
    expected = [1 / 3, -0.25, 0.25, 0.5, -0.5, -1 / 3, 0]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float64))
    # mean_std_norm: each pair of two distinct values becomes -+1/sqrt(2)
    s = 2 ** -0.5
    out = treerpo(tree_inputs(**EXAMPLE), eps=0.0)
    assert torch.allclose(out.advantages, torch.tensor([s, -s, s, s, -s, -s, 0], dtype=torch.float64))
    assert out.metrics["frac_zero_std_groups"] == pytest.approx(1 / 4)


def test_treerpo_first_nodes_of_two_trees_are_siblings():
    """Two trees of one prompt whose first nodes have values 0.5 and 0 get opposite,
    non-zero advantages (each first node used to sit alone in its sibling group)."""
    # tree 0: a -> {b (1), c (0)}: value(a) = 0.5;  tree 1: d -> {e (0), f (0)}: value(d) = 0
    rows = dict(rewards=[0, 1, 0, 0, 0, 0], groups=[0] * 6, trees=[0, 0, 0, 1, 1, 1],
                nodes=[0, 1, 2, 0, 1, 2], parents=[-1, 0, 0, -1, 0, 0])
    adv = treerpo(tree_inputs(**rows), eps=0.0).advantages
    # siblings {a, d}: values 0.5 and 0, mean 0.25, std sqrt(0.125): +-0.25 / sqrt(0.125) = +-1/sqrt(2)
    assert adv[0] == pytest.approx(2 ** -0.5) and adv[3] == pytest.approx(-(2 ** -0.5))
    # the same trees under two different prompts are not siblings
    apart = treerpo(tree_inputs(**{**rows, "groups": [0, 0, 0, 1, 1, 1]}), eps=0.0).advantages
    assert apart[0] == 0 and apart[3] == 0


def test_treerpo_row_penalty_lowers_only_the_node_itself():
    # b and c are siblings with equal values (both leaves of reward 1); b pays a penalty of 0.1
    rows = dict(rewards=[0, 1, 1], groups=[0] * 3, trees=[0] * 3, nodes=[0, 1, 2], parents=[-1, 0, 0])
    adv = treerpo(tree_inputs(**rows, penalty=[0.0, 0.1, 0.0]), mode="mean_norm").advantages
    assert torch.allclose(adv, torch.tensor([0.0, -0.05, 0.05], dtype=torch.float64))


def test_tree_grpo_refuses_a_row_penalty():
    with pytest.raises(ValueError, match="penalty_placement=episode"):
        tree_grpo(tree_inputs(**EXAMPLE, penalty=[0, 0.1, 0, 0, 0, 0, 0]))
    # a zero row penalty is no penalty
    zero = tree_grpo(tree_inputs(**EXAMPLE, penalty=[0.0] * 7)).advantages
    assert torch.equal(zero, tree_grpo(tree_inputs(**EXAMPLE)).advantages)


def test_tree_grpo_hand_worked():
    # leaves d 1, e 0, c 1, g 0.  inter (all 4 leaves, mean 0.5): d .5, e -.5, c .5, g -.5
    # intra tree 0 (mean 2/3): d 1/3, e -2/3, c 1/3; tree 1 has one leaf: 0
    # leaves: d 5/6, e -7/6, c 5/6, g -1/2
    # node_reduce=mean: b = mean(d, e) = -1/6; a = mean(d, e, c) = 1/6; f = g
    out = tree_grpo(tree_inputs(**EXAMPLE), mode="mean_norm", node_reduce="mean")
    expected = [1 / 6, -1 / 6, 5 / 6, 5 / 6, -7 / 6, -0.5, -0.5]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # node_reduce=sum (default): b = d + e = -1/3; a = d + e + c = 1/2
    out = tree_grpo(tree_inputs(**EXAMPLE), mode="mean_norm")
    expected = [0.5, -1 / 3, 5 / 6, 5 / 6, -7 / 6, -0.5, -0.5]
    assert torch.allclose(out.advantages, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert out.metrics["leaves_per_tree"] == 2.0


def test_tree_grpo_on_chains_equals_grpo():
    chains = AdvantageInputs(
        rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 1.0]), group_id=torch.tensor([0, 0, 0, 0, 1, 1]),
        traj_id=torch.tensor([0, 0, 1, 1, 2, 3]), step=torch.tensor([0, 1, 0, 1, 0, 0]),
    )
    assert torch.allclose(run_estimator(chains, "tree_grpo").advantages, run_estimator(chains, "grpo").advantages)
    # TreeRPO on chains: the first steps of a group's episodes are the prompt's children
    # (GRPO's advantage on the first step, with the one-step value = the episode's return);
    # every later step is an only child
    treerpo_adv = run_estimator(chains, "treerpo").advantages
    first = chains.step == 0
    assert torch.allclose(treerpo_adv[first], run_estimator(chains, "grpo").advantages[first])
    assert torch.equal(treerpo_adv[~first], torch.zeros(2))


@pytest.mark.parametrize("nodes, parents, match", [
    ([0, 0], [-1, -1], "twice"),
    ([0, 1], [-1, 5], "parent 5"),
    ([0, 1], [1, 0], "cycle"),
])
def test_bad_trees_are_rejected(nodes, parents, match):
    with pytest.raises(ValueError, match=match):
        tree_index(torch.zeros(2, dtype=torch.long), torch.tensor(nodes), torch.tensor(parents))


@st.composite
def forests(draw):
    rewards, groups, trees, nodes, parents = [], [], [], [], []
    tree = 0
    for g in range(draw(st.integers(1, 3))):
        for _ in range(draw(st.integers(1, 3))):
            size = draw(st.integers(1, 9))
            node_ids = draw(st.permutations(range(size)))  # node ids in any order
            for k in range(size):
                parent = -1 if k == 0 else node_ids[draw(st.integers(0, k - 1))]
                rewards.append(draw(st.sampled_from([0.0, 1.0, 0.5])))
                groups.append(g)
                trees.append(tree)
                nodes.append(node_ids[k])
                parents.append(parent)
            tree += 1
    perm = draw(st.permutations(range(len(rewards))))
    return tuple([xs[i] for i in perm] for xs in (rewards, groups, trees, nodes, parents))


@settings(max_examples=80, deadline=None)
@given(forests(), st.sampled_from(["mean_norm", "mean_std_norm"]), st.sampled_from(["sum", "mean"]))
def test_tree_estimators_equal_loop_references(forest, mode, node_reduce):
    rewards, groups, trees, nodes, parents = forest
    inp = tree_inputs(rewards, groups, trees, nodes, parents)
    fast = tree_grpo(inp, mode=mode, node_reduce=node_reduce).advantages
    slow = tree_grpo_loop(rewards, groups, trees, nodes, parents, mode=mode, node_reduce=node_reduce)
    assert torch.allclose(fast, torch.tensor(slow, dtype=torch.float64), atol=1e-9)
    fast = treerpo(inp, mode=mode).advantages
    slow = treerpo_loop(rewards, groups, trees, nodes, parents, mode=mode)
    assert torch.allclose(fast, torch.tensor(slow, dtype=torch.float64), atol=1e-9)
    penalty = [0.1 if (n + t) % 3 == 0 else 0.0 for n, t in zip(nodes, trees)]
    fast = treerpo(tree_inputs(rewards, groups, trees, nodes, parents, penalty), mode=mode).advantages
    slow = treerpo_loop(rewards, groups, trees, nodes, parents, mode=mode, penalty=penalty)
    assert torch.allclose(fast, torch.tensor(slow, dtype=torch.float64), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(forests())
def test_treerpo_sibling_advantages_sum_to_zero(forest):
    rewards, groups, trees, nodes, parents = forest
    adv = treerpo(tree_inputs(rewards, groups, trees, nodes, parents)).advantages
    sums: dict = {}
    for a, g, t, p in zip(adv.tolist(), groups, trees, parents):
        key = ("prompt", g) if p < 0 else (t, p)
        sums[key] = sums.get(key, 0.0) + a
    assert all(abs(v) < 1e-9 for v in sums.values())
