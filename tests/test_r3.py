"""R³ (replay, reflection, ranking reward): the task history's bounds, replay into groups
whose episodes all ended alike (ids, off-policy flag, alpha through the advantages), the
entropy ranking reward by hand, the reflection note on a real environment, and the
sampler in a training run that resumes with its history."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grpo_lab.advantages import AdvantagePipeline
from grpo_lab.data import RolloutBatch
from grpo_lab.envs import make_env
from grpo_lab.rollout.r3 import (REFLECTION_HEADER, R3Config, ReflectingEnv, StoredEpisode, TaskHistory,
                                 entropy_rank_rewards, reflection_note, remember, replay_into_groups)


def episodes(rewards, won, groups, anchors, logprobs=None, traj=None):
    """Single-turn episodes: one row each."""
    n = len(rewards)
    logprobs = logprobs or [[-1.0, -1.0]] * n
    return RolloutBatch(group_id=groups, traj_id=traj if traj is not None else list(range(n)), step=[0] * n,
                        prompt_ids=[[1, 2]] * n, response_ids=[[3] * len(lp) for lp in logprobs], rollout_logprobs=logprobs,
                        loss_mask=[[1.0] * len(lp) for lp in logprobs], reward=rewards, done=[True] * n,
                        valid_action=[True] * n, won=won, anchor=anchors, policy_version=[0] * n)


def stored(ret: float, won: bool, tag: int = 0) -> StoredEpisode:
    rows = episodes([ret], [won], [99], ["task-a"], logprobs=[[-0.5 - tag]])
    return StoredEpisode(rows, ret, won, f"attempt {tag}")


def test_the_history_keeps_the_most_recent_episodes_of_the_most_recent_tasks():
    h = TaskHistory(capacity=2, max_tasks=2)
    for tag in range(3):
        h.add("a", stored(0.0, False, tag))
    assert [e.text for e in h.past("a", False, 5)] == ["attempt 2", "attempt 1"]  # capacity 2, most recent first
    h.add("b", stored(1.0, True))
    h.add("a", stored(1.0, True, 7))  # a is played again: b is now the least recent
    h.add("c", stored(0.0, False))
    assert h.tasks == 2 and h.past("b", True, 1) == [] and h.past("a", True, 1)[0].text == "attempt 7"
    assert h.recent_mean_return("a", 2) == pytest.approx(0.5) and h.recent_mean_return("zzz", 2) is None
    import copy

    snapshot = copy.deepcopy(h)  # what the sampler state keeps after every step: shares the episodes
    snapshot.add("d", stored(0.0, False))
    assert h.tasks == 2 and snapshot.tasks == 2 and snapshot.past("c", False, 1)[0] is h.past("c", False, 1)[0]
    assert h.past("a", True, 1) and not snapshot.past("a", True, 1)  # a left the snapshot only
    smaller = h.resized(1, 1)  # a resume with smaller bounds keeps the newest
    assert smaller.tasks == 1 and smaller.past("c", False, 5) and len(smaller) == 1


def test_groups_that_all_failed_take_past_successes_and_alpha_reaches_their_advantages():
    """Group 0 (task a) failed twice; the history holds three successes of a: the two most
    recent join as episodes 0*4+2 and 0*4+3, off-policy, scaled by alpha = 0.5. Group 1
    (task b) has both outcomes: untouched. GRPO on group 0's (0, 0, 1, 1): mean 0.5, std
    sqrt(1/3): -0.866 for the new ones, +0.866 * 0.5 for the replayed."""
    history = TaskHistory(8, 100)
    for tag in range(3):
        history.add("a", stored(1.0, True, tag))
    history.add("b", stored(1.0, True))
    batch = episodes([0.0, 0.0, 1.0, 0.0], [False, False, True, False], [0, 0, 1, 1], ["a", "a", "b", "b"])
    out, metrics = replay_into_groups(batch, history, k=2, alpha=0.5, group_size=2)
    assert out.traj_id.tolist() == [0, 1, 4, 5, 2, 3]
    assert out.group_id.tolist() == [0, 0, 1, 1, 0, 0]
    assert out.off_policy.tolist() == out.replayed.tolist() == [False] * 4 + [True] * 2
    assert out.advantage_scale.tolist() == [1.0] * 4 + [0.5] * 2
    assert [lp.tolist() for lp in out.rollout_logprobs[4:]] == [[-2.5], [-1.5]]  # tags 2, 1: their behaviour log-probs
    assert metrics == {"r3_groups_replayed": 1.0, "r3_replayed_episodes": 2.0}
    adv = AdvantagePipeline.of("grpo", {"scale_rewards": "group", "eps": 0.0}, penalty_placement="episode")(out).advantages
    z = 0.5 / math.sqrt(1 / 3)
    assert adv.tolist() == pytest.approx([-z, -z, 0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0.5 * z, 0.5 * z])


def test_groups_that_all_succeeded_take_past_failures_and_no_past_means_no_replay():
    history = TaskHistory(8, 100)
    history.add("a", stored(0.0, False))
    batch = episodes([1.0, 1.0, 0.0, 0.0], [True, True, False, False], [0, 0, 1, 1], ["a", "a", "b", "b"])
    out, metrics = replay_into_groups(batch, history, k=2, alpha=1.0, group_size=2)
    assert len(out) == 5 and out.won.tolist() == [True, True, False, False, False]
    assert metrics["r3_replayed_episodes"] == 1.0


def test_entropy_ranking_reward_by_hand():
    """Group 0's three failures, surprisal (1, 1) / (2, 4) / (0.5, 0.5): scores mean + std =
    1, 4, 0.5: ranks 1, 2, 0: bonuses 0.1 * (1/2, 0, 1). The won episode and group 1's lone
    failure get nothing."""
    batch = episodes([0.0, 0.0, 0.0, 1.0, 0.0], [False, False, False, True, False], [0, 0, 0, 0, 1],
                     ["a"] * 4 + ["b"], logprobs=[[-1.0, -1.0], [-2.0, -4.0], [-0.5, -0.5], [-9.0, -9.0], [-3.0, -3.0]])
    out, metrics = entropy_rank_rewards(batch, 0.1)
    assert out.reward_shaping.tolist() == pytest.approx([0.05, 0.0, 0.1, 0.0, 0.0])
    assert torch.equal(out.reward, batch.reward)  # the environment's reward, as the step's metrics report it
    assert metrics["r3_ranked_episodes"] == 2.0  # the worst of three gets 0


def test_reflection_note_reaches_the_first_observation_of_a_failing_task():
    env = make_env("countdown")
    first = env.reset(5)
    history = TaskHistory(8, 100)
    config = R3Config(reflection_threshold=0.5, reflection_attempts=2, reflection_tokens=3)
    history.add(first.anchor, StoredEpisode(episodes([0.0], [False], [0], [first.anchor]), 0.0, False,
                                            "one two three four five"))

    def cut(text, tokens):
        return " ".join(text.split()[:tokens])

    note = reflection_note(history, first.anchor, config, cut)
    assert note.startswith(REFLECTION_HEADER) and "- one two three\n" in note and "four" not in note
    counter = [0]
    wrapped = ReflectingEnv(make_env("countdown"), lambda anchor: reflection_note(history, anchor, config, cut), counter)
    obs = wrapped.reset(5)
    assert obs.text == note + first.text and obs.anchor == first.anchor and counter == [1]
    assert wrapped.reset(6).text == make_env("countdown").reset(6).text  # another task: no note
    history.add(first.anchor, stored(1.0, True))  # mean return 0.5: not below the threshold
    assert reflection_note(history, first.anchor, config, cut) == ""


def test_remember_stores_the_new_episodes_under_their_initial_state():
    history = TaskHistory(8, 100)
    batch = episodes([0.0, 1.0], [False, True], [0, 0], ["s0", "s0"])
    remember(batch, history, lambda ids: " ".join(map(str, ids)))
    assert [e.won for e in history.past("s0", True, 5)] == [True] and history.past("s0", False, 5)[0].text == "3 3"


# ------------------------------------------------------------------ the sampler in training
TINY = ["algo.group_size=2", "trainer.tasks_per_step=2", "trainer.eval_episodes=0", "model.tiny_hidden_size=32",
        "model.tiny_num_heads=1", "model.tiny_num_kv_heads=1", "model.tiny_num_layers=1",
        "model.tiny_intermediate_size=64", "logger.wandb=false", "logger.progress_bar=false", "logger.plot=false",
        "trainer.save_final=false", "env=dataset", "env.kwargs.path=two.jsonl", "env.kwargs.prompt_column=question",
        "env.kwargs.rewards=[coin:even_length]", "rollout.max_new_tokens=6", "rollout.sampler=r3",
        "rollout.r3.reflection_threshold=0.6", "trainer.checkpoint_every=1"]


@pytest.fixture
def coin_task(tmp_path, monkeypatch):
    """Two questions (so tasks recur) and a coin-flip success (an even-length answer)."""
    (tmp_path / "two.jsonl").write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in ("a?", "b?")))
    (tmp_path / "coin.py").write_text("def even_length(prompt, completion, row):\n"
                                      "    return float(len(completion) % 2 == 0)\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(tmp_path, steps, name, extra=()):
    from hydra import compose, initialize_config_module

    from grpo_lab.train import build_config
    from grpo_lab.trainer import Trainer

    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        config = build_config(compose(config_name="config", overrides=TINY + list(extra) + [f"trainer.total_steps={steps}"]))
    Trainer(config, output_dir=tmp_path / name).train()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_r3_replays_reflects_and_resumes_with_its_history(coin_task):
    whole = run(coin_task, 6, "whole")
    assert sum(r["r3_replayed_episodes"] for r in whole) > 0 and sum(r["r3_reflected_episodes"] for r in whole) > 0
    assert all(r["r3_history_tasks"] <= 2 for r in whole)
    assert any(r["num_rows"] > 4 for r in whole)  # replayed rows train with the group
    run(coin_task, 3, "part")
    resumed = run(coin_task, 6, "part", ["trainer.resume=true"])
    for key in ("r3_replayed_episodes", "r3_reflected_episodes", "reward_mean", "num_rows", "loss"):
        assert [r.get(key) for r in resumed[3:]] == pytest.approx([r.get(key) for r in whole[3:]], rel=1e-6), key


def test_the_steps_episode_metrics_leave_replayed_episodes_out():
    from grpo_lab.evaluation import rollout_metrics

    history = TaskHistory(8, 100)
    history.add("a", stored(1.0, True))
    batch = episodes([0.0, 0.0, 1.0, 0.0], [False, False, True, False], [0, 0, 1, 1], ["a", "a", "b", "b"])
    out, _ = replay_into_groups(batch, history, k=2, alpha=0.5, group_size=2)
    metrics = rollout_metrics(out)
    assert metrics["success_rate"] == 0.25 and metrics["episodes"] == 4  # the replayed success is not this step's
    assert metrics["groups_all_alike"] == 0.5  # group 0's two new episodes both failed
    assert metrics["num_rows"] == 5 and metrics["response_tokens"] == 9  # but it trains
