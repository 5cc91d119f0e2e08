"""AR3PO adaptive rollout and response reuse: stage bookkeeping, the reuse buffer, the
reused episode's loss mask, and the learning signal reuse gives an all-wrong group."""

from __future__ import annotations

import random

import pytest
import torch

from grpo_lab.advantages import compute_advantages
from grpo_lab.data import RolloutBatch
from grpo_lab.rollout.adaptive import AdaptiveConfig, ReuseBuffer, adaptive_rollout, episodes_of


def episodes(outcomes, first_group, steps=2):
    """A batch with one group per entry of ``outcomes`` (a list of won flags per episode);
    every episode has ``steps`` rows; the last row carries the outcome."""
    rows = dict(group_id=[], traj_id=[], step=[], prompt_ids=[], response_ids=[], rollout_logprobs=[], loss_mask=[],
                reward=[], done=[], valid_action=[], won=[], anchor=[])
    traj = 1000 * first_group
    for g, flags in enumerate(outcomes):
        for won in flags:
            for t in range(steps):
                last = t == steps - 1
                rows["group_id"].append(first_group + g)
                rows["traj_id"].append(traj)
                rows["step"].append(t)
                rows["prompt_ids"].append([1, 2, 3])
                rows["response_ids"].append([4, 5])
                rows["rollout_logprobs"].append([-0.5, -0.5])
                rows["loss_mask"].append([1.0, 1.0])
                rows["reward"].append(float(won and last))
                rows["done"].append(last)
                rows["valid_action"].append(True)
                rows["won"].append(bool(won and last))
                rows["anchor"].append(("s", t))
            traj += 1
    return RolloutBatch(**rows)


class ScriptedPlay:
    """``script[seed]`` is the list of won flags that seed's episodes get, in order."""

    def __init__(self, script):
        self.script, self.calls = {k: list(v) for k, v in script.items()}, []

    def __call__(self, seeds, n, stage):
        self.calls.append((list(seeds), n, stage))
        return episodes([[self.script[s].pop(0) for _ in range(n)] for s in seeds], first_group=50 + 10 * stage)


def test_stages_stop_sampling_a_prompt_once_it_is_solved():
    """Hand-worked: seed 1 is solved in stage 1 (2 episodes), seed 2 in stage 2 (4),
    seed 3 never (4); stage 2 samples only seeds 2 and 3."""
    play = ScriptedPlay({1: [0, 1], 2: [0, 0, 1, 0], 3: [0, 0, 0, 0]})
    cfg = AdaptiveConfig(stages=2, responses_per_stage=2, reuse=False)
    batch, st = adaptive_rollout(play, [1, 2, 3], ["a", "b", "c"], cfg, None, first_group_id=7)
    assert [c[0] for c in play.calls] == [[1, 2, 3], [2, 3]]
    assert st.responses == [2, 4, 4] and st.stages_run == 2 and st.unsolved == 1 and st.reused == 0
    assert st.responses_per_prompt == pytest.approx(10 / 3)
    per_group = {g: len(set(batch.traj_id[batch.group_id == g].tolist())) for g in (7, 8, 9)}
    assert per_group == {7: 2, 8: 4, 9: 4}
    assert len(set(batch.traj_id.tolist())) == 10  # trajectory ids stay unique across stages
    assert set(batch.traj_id[batch.group_id == 8].tolist()) == {8 * 4 + k for k in range(4)}


def test_all_solved_after_the_first_stage_skips_the_rest():
    play = ScriptedPlay({1: [1, 0], 2: [0, 1]})
    _, st = adaptive_rollout(play, [1, 2], ["a", "b"], AdaptiveConfig(stages=3, responses_per_stage=2), None)
    assert len(play.calls) == 1 and st.stages_run == 1 and st.responses == [2, 2]


@pytest.mark.parametrize("mode", ["stop_gradient", "off_policy"])
def test_reuse_puts_a_buffered_correct_episode_in_place_of_a_wrong_one(mode):
    """Properties: the unsolved task keeps its group size; one of its episodes is the
    buffered correct one; its loss mask is zero only under stop_gradient; the stats name
    exactly its rows; the buffer then holds only freshly generated correct episodes."""
    buffer = ReuseBuffer(capacity=2, rng=random.Random(0))
    old = episodes([[1]], first_group=0, steps=3)
    buffer.add("c", old)
    play = ScriptedPlay({1: [1, 0], 3: [0, 0, 0, 0]})
    cfg = AdaptiveConfig(stages=2, responses_per_stage=2, reuse_mode=mode)
    batch, st = adaptive_rollout(play, [1, 3], ["a", "c"], cfg, buffer)
    group_c = batch.group_id == 1
    assert len(set(batch.traj_id[group_c].tolist())) == 4  # size unchanged by reuse
    assert st.reused == 1 and len(st.reused_rows) == 3
    reused = batch.select(st.reused_rows)
    assert bool(reused.won.any()) and set(reused.group_id.tolist()) == {1} and len(set(reused.traj_id.tolist())) == 1
    expected = 0.0 if mode == "stop_gradient" else 1.0
    assert all(float(m.max()) == expected and float(m.min()) == expected for m in reused.loss_mask)
    others = [i for i in range(len(batch)) if i not in st.reused_rows]
    assert all(float(batch.loss_mask[i].min()) == 1.0 for i in others)
    # the reused rows are marked and keep the behaviour policy's log-probs, for the importance weight
    assert torch.nonzero(batch.off_policy).flatten().tolist() == st.reused_rows
    assert all(torch.equal(a, b) for a, b in zip(reused.rollout_logprobs, old.rollout_logprobs))
    assert buffer.size("a") == 1 and buffer.size("c") == 1  # the reused episode is not added again


def test_reuse_gives_an_all_wrong_group_a_learning_signal():
    """Property: without reuse an all-wrong group has zero advantage everywhere; with a
    reused correct episode its wrong episodes get a negative advantage."""
    def run(buffer):
        play = ScriptedPlay({3: [0, 0, 0, 0]})
        batch, _ = adaptive_rollout(play, [3], ["c"], AdaptiveConfig(stages=2, responses_per_stage=2), buffer)
        return batch, compute_advantages(batch, "grpo", 0.0, {}, {}).advantages

    batch, adv = run(None)
    assert torch.all(adv == 0)
    buffer = ReuseBuffer(1, random.Random(0))
    buffer.add("c", episodes([[1]], 0))
    batch, adv = run(buffer)
    wrong = ~batch.won & batch.done
    assert bool((adv[wrong] < 0).all())


def test_buffer_keeps_the_most_recent_correct_episodes_and_checks_its_input():
    buffer = ReuseBuffer(capacity=2, rng=random.Random(0))
    eps = [episodes([[1]], first_group=g) for g in range(3)]
    for ep in eps:
        buffer.add("k", ep)
    assert buffer.size("k") == 2 and len(buffer) == 2
    drawn = {int(buffer.sample("k").traj_id[0]) for _ in range(50)}
    assert drawn == {1000, 2000}  # the oldest episode (group 0) was dropped
    assert buffer.sample("unknown") is None
    with pytest.raises(ValueError, match="won"):
        buffer.add("k", episodes([[0]], 0))
    with pytest.raises(ValueError, match="one episode"):
        buffer.add("k", episodes([[1, 1]], 0))


def test_episodes_of_cuts_a_batch_by_trajectory():
    batch = episodes([[1, 0], [0]], first_group=0, steps=3)
    parts = episodes_of(batch)
    assert [len(p) for p in parts] == [3, 3, 3] and [int(p.traj_id[0]) for p in parts] == [0, 1, 2]


def test_adaptive_config_names_bad_values():
    with pytest.raises(ValueError, match="'fresh'"):
        AdaptiveConfig(reuse_mode="fresh")
    with pytest.raises(ValueError, match="stages"):
        AdaptiveConfig(stages=0)
