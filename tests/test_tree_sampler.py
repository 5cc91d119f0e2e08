"""Tree sampling (Tree-GRPO steps, TreeRPO token segments): tree bookkeeping, exact token
accounting, expansion only from non-leaf nodes and the root, and batches the tree
estimators accept."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from grpo_lab.advantages import compute_advantages
from grpo_lab.rollout import AgentLoopConfig, Completion, PromptEncoder, SamplingParams
from grpo_lab.rollout.backend import per_request
from grpo_lab.rollout.tree import TreeSamplerConfig, sample_trees

from test_scheduler import CorridorEnv, HashBackend  # noqa: E402


class SegmentBackend:
    """Deterministic in (prompt, seed); answers ``<action>right</action>`` or
    ``<action>wait</action>`` or junk, cut at ``max_tokens``; finish "stop" only when the
    whole answer fitted."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.answers = ["<action>right</action>", "<action>wait</action>", "well... <action>right</action>", "zzz"]

    def generate(self, prompts, params):
        out = []
        for p, sp in zip(prompts, per_request(params, len(prompts))):
            h = zlib.crc32(bytes(str((list(p), sp.seed)), "utf8"))
            ids = self.tokenizer(self.answers[h % len(self.answers)], add_special_tokens=False)["input_ids"]
            cut = ids[: sp.max_tokens]
            out.append(Completion(cut, [-0.5] * len(cut), "stop" if len(cut) == len(ids) else "length"))
        return out


def config(max_tokens=24):
    return AgentLoopConfig(group_size=1, max_steps=5, history_window=1,
                           sampling=SamplingParams(max_tokens=max_tokens, stop=("</action>",)), request_seed=5)


def paths(batch):
    """For each leaf row: the row indices from the top of its tree down to it."""
    where = {(int(t), int(n)): i for i, (t, n) in enumerate(zip(batch.tree_id, batch.node_id))}
    out = []
    for i in torch.nonzero(batch.done).flatten().tolist():
        path = [i]
        while int(batch.parent_id[path[-1]]) >= 0:
            path.append(where[(int(batch.tree_id[path[-1]]), int(batch.parent_id[path[-1]]))])
        out.append(path[::-1])
    return out


@pytest.mark.parametrize("kind", ["step", "segment"])
def test_tree_bookkeeping_every_leaf_path_is_a_real_episode(tokenizer, kind):
    """Properties: node ids are unique per tree and every parent exists; a node's parent
    is not a leaf; every leaf's parent chain replays, action by action, to the states the
    rows recorded; the number of leaves is M (1 + L N) when trees are deep enough."""
    tree = TreeSamplerConfig(trees_per_prompt=2, rounds=2, nodes_per_round=2, node=kind, segment_tokens=4)
    backend = SegmentBackend(tokenizer) if kind == "segment" else HashBackend(tokenizer)
    batch, stats = sample_trees(backend, PromptEncoder(tokenizer), CorridorEnv, [0, 1], config(), tree, random.Random(0),
                                first_group_id=4)
    assert set(batch.group_id.tolist()) == {4, 5}
    assert len(set(batch.tree_id.tolist())) == 4
    keys = list(zip(batch.tree_id.tolist(), batch.node_id.tolist()))
    assert len(set(keys)) == len(keys)
    done = {k: bool(d) for k, d in zip(keys, batch.done)}
    for t, p in zip(batch.tree_id.tolist(), batch.parent_id.tolist()):
        if p >= 0:
            assert (t, p) in done and not done[(t, p)], "a branch hangs from a missing node or a leaf"
    leaf_paths = paths(batch)
    assert stats.leaves == len(leaf_paths) == int(batch.done.sum())
    assert stats.expansions_short > 0 or len(leaf_paths) == 2 * tree.leaves_per_prompt()
    tok = tokenizer
    for path in leaf_paths:
        env = CorridorEnv()
        obs = env.reset(int(batch.group_id[path[0]]) - 4)
        answer: list[int] = []
        for depth, i in enumerate(path):
            assert batch.anchor[i] == obs.anchor, "a node acts from a state its path did not reach"
            if answer:  # a segment continues the same turn: its prompt ends with the turn's tokens so far
                assert batch.prompt_ids[i][-len(answer):].tolist() == answer
            answer += batch.response_ids[i].tolist()
            if kind == "step" or int(batch.step[i]) != int(batch.step[path[min(depth + 1, len(path) - 1)]]) or i == path[-1]:
                from grpo_lab.rollout import parse_action

                action = parse_action(tok.decode(answer, skip_special_tokens=True))
                if action is not None:
                    result = env.step(action)
                    obs = result.observation
                    assert float(batch.reward[i]) == result.reward
                answer = []
        assert int(batch.traj_id[path[-1]]) in set(batch.traj_id[path].tolist())


def test_token_and_tool_call_accounting_is_exact(tokenizer):
    """Properties: generated tokens are the sum of response lengths; new env steps are the
    rows whose answer parsed; replayed steps are counted apart."""
    tree = TreeSamplerConfig(trees_per_prompt=1, rounds=1, nodes_per_round=3)
    batch, stats = sample_trees(HashBackend(tokenizer), PromptEncoder(tokenizer), CorridorEnv, [0, 2], config(), tree,
                                random.Random(1))
    from grpo_lab.rollout import parse_action

    assert stats.generated_tokens == batch.num_response_tokens()
    parsed = sum(parse_action(tokenizer.decode(r.tolist(), skip_special_tokens=True)) is not None for r in batch.response_ids)
    assert stats.env_steps == parsed
    assert stats.nodes == len(batch)
    assert stats.replayed_env_steps >= 0


def test_segments_never_exceed_their_length(tokenizer):
    tree = TreeSamplerConfig(trees_per_prompt=1, rounds=1, nodes_per_round=2, node="segment", segment_tokens=3)
    batch, _ = sample_trees(SegmentBackend(tokenizer), PromptEncoder(tokenizer), CorridorEnv, [1], config(), tree,
                            random.Random(0))
    assert all(1 <= len(r) <= 3 for r in batch.response_ids)
    assert any(not d and v and float(rw) == 0 for d, v, rw in zip(batch.done, batch.valid_action, batch.reward))


def test_expansion_picks_are_reproducible_and_depend_on_the_rng(tokenizer):
    tree = TreeSamplerConfig(trees_per_prompt=1, rounds=2, nodes_per_round=1)
    run = lambda seed: sample_trees(HashBackend(tokenizer), PromptEncoder(tokenizer), CorridorEnv, [0], config(), tree,  # noqa: E731
                                    random.Random(seed))[0]
    a, b = run(0), run(0)
    assert torch.equal(a.parent_id, b.parent_id) and torch.equal(a.node_id, b.node_id)
    assert any(not torch.equal(run(0).parent_id, run(s).parent_id) for s in range(1, 8))


@pytest.mark.parametrize("estimator", ["tree_grpo", "treerpo"])
def test_tree_batches_feed_the_tree_estimators(tokenizer, estimator):
    tree = TreeSamplerConfig(trees_per_prompt=2, rounds=1, nodes_per_round=2)
    batch, _ = sample_trees(HashBackend(tokenizer), PromptEncoder(tokenizer), CorridorEnv, [0, 1, 2], config(), tree,
                            random.Random(0))
    out = compute_advantages(batch, estimator, 0.1, {}, {})  # each estimator's default placement
    assert out.advantages.shape == (len(batch),) and torch.isfinite(out.advantages).all()


def test_root_expansion_adds_top_level_nodes_that_are_siblings(tokenizer):
    """With ``expand_root`` (default) an expansion may start from the prompt: a tree then
    has several top-level nodes, each a real first step from the reset state, and TreeRPO
    compares all top-level nodes of the prompt. Without it every tree has one."""
    def tops(expand_root, seed):
        tree = TreeSamplerConfig(trees_per_prompt=2, rounds=2, nodes_per_round=2, expand_root=expand_root)
        batch, _ = sample_trees(HashBackend(tokenizer), PromptEncoder(tokenizer), CorridorEnv, [0], config(), tree,
                                random.Random(seed))
        top = batch.parent_id < 0
        return batch, top

    counts = []
    for seed in range(6):
        batch, top = tops(True, seed)
        counts.append(int(top.sum()))
        reset = CorridorEnv().reset(0).anchor
        assert all(batch.anchor[i] == reset and int(batch.step[i]) == 0 for i in torch.nonzero(top).flatten().tolist())
        _, top_without = tops(False, seed)
        assert int(top_without.sum()) == 2
    assert max(counts) > 2  # some expansion started from the root


def test_a_nondeterministic_environment_is_caught_on_replay(tokenizer):
    class Drifting(CorridorEnv):
        resets = 0

        def reset(self, seed):
            Drifting.resets += 1
            return super().reset(seed + Drifting.resets)

    tree = TreeSamplerConfig(trees_per_prompt=1, rounds=1, nodes_per_round=1)
    with pytest.raises(RuntimeError, match="deterministic in its seed"):
        sample_trees(HashBackend(tokenizer), PromptEncoder(tokenizer), Drifting, [0], config(), tree, random.Random(0))


def test_tree_config_names_bad_values():
    with pytest.raises(ValueError, match="'token'"):
        TreeSamplerConfig(node="token")
    with pytest.raises(ValueError, match="nodes_per_round"):
        TreeSamplerConfig(nodes_per_round=0)
