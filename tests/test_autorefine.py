"""AutoRefine's search-and-refine protocol on ``search_qa`` (Shi et al. 2025): a refine
must follow each search's passages, the refined evidence stays in the observation, and the
reward is the answer's score when positive, else the retrieval reward when the refined
evidence holds the answer (the official compute_reward with format_score 0)."""

from __future__ import annotations

import pytest

from grpo_lab.envs import make_env
from grpo_lab.envs.search_qa import REFINE_INSTRUCTION, covers_answer
from grpo_lab.rollout.demonstrations import format_demonstrations


def episode(answer: str, refine_text: str | None, reward: str = "em"):
    env = make_env("search_qa", refine=True, retrieval_reward=0.1, reward=reward)
    env.reset(2)
    gold = env.questions[env.qid][1][0]
    env.step("<search>born</search>")
    env.step(f"<refine>{(refine_text or 'nothing').format(gold=gold)}</refine>")
    return env.step(f"<answer>{answer.format(gold=gold)}</answer>")


def test_reward_by_hand():
    right = episode("{gold}", "it is {gold}")
    assert right.reward == 1.0 and right.info["rewards"] == {"answer": 1.0, "retrieval": 1.0}
    kept = episode("wrong", "the answer is {gold}.")
    assert kept.reward == pytest.approx(0.1) and not kept.info["won"] and kept.info["searches"] == 1
    assert kept.info["metrics"] == {"searches": 0.0, "refines": 0.0, "refines_with_answer": 0.0}  # the answer's own
    env = make_env("search_qa", refine=True)
    env.reset(2)
    gold = env.questions[env.qid][1][0]
    assert env.step("<search>born</search>").info["metrics"] == {"searches": 1.0, "refines": 0.0,
                                                                 "refines_with_answer": 0.0}
    assert env.step(f"<refine>{gold}</refine>").info["metrics"] == {"searches": 0.0, "refines": 1.0,
                                                                    "refines_with_answer": 1.0}
    assert episode("wrong", "nothing useful").reward == 0.0
    partial = episode("{gold} city", "nothing", reward="f1")  # F1 > 0: the answer's score, no retrieval reward
    assert 0 < partial.reward < 1 and partial.info["rewards"]["retrieval"] == 0.0


def test_a_refine_must_follow_each_search_and_only_then():
    env = make_env("search_qa", refine=True)
    obs = env.reset(3)
    assert "Refined evidence:\nnothing yet" in obs.text
    assert not env.step("<refine>early</refine>").info["valid_action"]
    env.step("<search>born</search>")
    assert not env.step("<search>again</search>").info["valid_action"]
    assert not env.step("<answer>x</answer>").info["valid_action"]
    obs = env.step("<refine>a fact</refine>").observation
    assert "- a fact" in obs.text and env.step("<search>more</search>").info["valid_action"]
    assert all(a.startswith("<refine>") for a in env.legal_actions())


def test_settings_are_checked_and_plain_search_qa_is_unchanged():
    with pytest.raises(ValueError, match="retrieval_reward.*refine=False"):
        make_env("search_qa", retrieval_reward=0.1)
    plain = make_env("search_qa")
    assert plain.text_format.tags == ("search", "answer") and "Refined" not in plain.reset(0).text
    assert covers_answer("It was Kalo Venn, indeed.", ["kalo venn"]) and not covers_answer("Kalo", ["Kalo Venn"])


def test_the_warm_up_writes_refine_turns_after_searches():
    pairs = list(format_demonstrations(lambda: make_env("search_qa", refine=True), 10, 6, 2, seed=0))
    assert all(p.startswith(REFINE_INSTRUCTION) for p, _ in pairs)
    for (prompt, action), (_, after) in zip(pairs, pairs[1:]):
        if action.startswith("<search>"):
            assert after.startswith("<refine>")


def test_the_environments_figures_are_logged_beside_the_reward_parts():
    from grpo_lab.data import RolloutBatch
    from grpo_lab.evaluation import rollout_metrics
    from grpo_lab.rollout.episode import reward_parts

    result = episode("wrong", "the answer is {gold}.")
    parts = reward_parts(result)
    assert parts == {"answer": 0.0, "retrieval": 1.0, "env/searches": 0.0, "env/refines": 0.0,
                     "env/refines_with_answer": 0.0}
    batch = RolloutBatch(group_id=[0], traj_id=[0], step=[0], prompt_ids=[[1]], response_ids=[[2]],
                         rollout_logprobs=[[0.0]], loss_mask=[[1.0]], reward=[0.1], done=[True], valid_action=[True],
                         anchor=[0], reward_parts=[parts])
    metrics = rollout_metrics(batch)
    assert metrics["env/searches"] == 0.0 and metrics["reward/retrieval"] == 1.0 and "reward/env/searches" not in metrics
    # per episode: two rows of one episode, a search and a refine holding the answer
    rows = [{"env/searches": 1.0, "env/refines": 0.0}, {"env/searches": 0.0, "env/refines": 1.0}]
    two = RolloutBatch(group_id=[0, 0], traj_id=[0, 0], step=[0, 1], prompt_ids=[[1], [1]], response_ids=[[2], [2]],
                       rollout_logprobs=[[0.0], [0.0]], loss_mask=[[1.0], [1.0]], reward=[0.0, 0.1],
                       done=[False, True], valid_action=[True, True], anchor=[0, 1], reward_parts=rows)
    assert {k: v for k, v in rollout_metrics(two).items() if k.startswith("env/")} == {"env/searches": 1.0,
                                                                                       "env/refines": 1.0}
