"""``env=agent``: users' agent functions as a run's episodes, through the endpoint over
real HTTP, with the real ``openai`` client inside the agents (tests/agent_fixtures.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chat_templates import chat_tokenizer
from grpo_lab.modeling import build_tiny_model
from grpo_lab.rollout.backends.hf import HFBackend
from grpo_lab.rollout.faults import FaultLog
from grpo_lab.endpoint.agents import AgentTasks
from grpo_lab.endpoint.app import ServeSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy():
    tok = chat_tokenizer("chatml")
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128, seed=0)
    return model, tok


def player(tmp_path, policy, entry: str, rows: list[dict], **kwargs):
    model, tok = policy
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = AgentTasks(entry=f"agent_fixtures:{entry}", tasks=str(path), **kwargs)
    return tasks.episode_player(HFBackend(model, tok), tok, ServeSettings(model="policy", max_tokens=6, max_context=400,
                                                                          fixed_sampling=True))


def test_each_call_is_a_row_the_episode_reward_goes_to_its_last_and_attached_rewards_and_anchors_to_theirs(tmp_path,
                                                                                                           policy):
    """Two tasks of 3 and 2 calls, two episodes each: one row per call, group and
    trajectory ids as the turn loop numbers them, the step reward the agent attached on
    its first call, the episode's reward on its last (won when it reaches 1), its
    anchors, and each later call's prompt extending the one before."""
    rows = [{"name": "a", "calls": 3, "reward": 1.0}, {"name": "b", "calls": 2, "reward": 0.25}]
    play = player(tmp_path, policy, "counting", rows)
    faults = FaultLog()
    batch, stats = play([0, 1], 2, 10, faults)
    assert (faults.episodes, faults.episodes_dropped) == (4, 0) and len(batch) == 10
    assert sorted(set(batch.group_id.tolist())) == [10, 11] and sorted(set(batch.traj_id.tolist())) == [20, 21, 22, 23]
    for traj, name, calls, final in ((20, "a", 3, 1.0), (21, "a", 3, 1.0), (22, "b", 2, 0.25), (23, "b", 2, 0.25)):
        idx = [i for i, t in enumerate(batch.traj_id.tolist()) if t == traj]
        assert batch.step[idx].tolist() == list(range(calls))
        assert batch.reward[idx].tolist() == [0.5] + [0.0] * (calls - 2) + [final]
        assert batch.done[idx].tolist() == [False] * (calls - 1) + [True]
        assert batch.won[idx].tolist() == [False] * (calls - 1) + [final >= 1.0]
        assert [batch.anchor[i] for i in idx] == [("state", name, k) for k in range(calls)]
        for prev, nxt in zip(idx, idx[1:]):
            head = [*batch.prompt_ids[prev].tolist(), *batch.response_ids[prev].tolist()]
            assert batch.prompt_ids[nxt].tolist()[: len(head)] == head
    assert stats["agent_calls"] == 10 and stats["agent_calls_extending"] == pytest.approx(6 / 10)
    assert batch.trajectory_returns().tolist() == [1.5, 1.5, 0.75, 0.75]


def test_agents_that_raise_return_nan_or_text_lose_their_episode_and_are_counted(tmp_path, policy):
    rows = [{"kind": "counting", "name": "ok", "calls": 1, "reward": 1.0}, {"kind": "raising"}, {"kind": "nan"}]
    faults = FaultLog()
    batch, _ = player(tmp_path, policy, "by_task", rows)([0, 1, 2], 2, 0, faults)
    assert (faults.episodes, faults.episodes_dropped) == (6, 4)
    assert set(batch.group_id.tolist()) == {0} and len(batch) == 2
    text = "\n".join(faults.examples)
    assert "KeyError: 'the tool is gone'" in text and "not a finite number" in text and "seed 1" in text
    faults = FaultLog()
    batch, _ = player(tmp_path, policy, "text_reward", rows[:1])([0], 2, 0, faults)
    assert faults.episodes_dropped == 2 and "returned '1.0' (str), not a number" in faults.examples[0]


@pytest.mark.parametrize("entry", ["hanging", "hanging_plain", "silent"])
def test_a_hanging_or_silent_agent_loses_its_episode_and_the_rollout_goes_on(tmp_path, policy, entry):
    faults = FaultLog()
    batch, _ = player(tmp_path, policy, entry, [{"name": "x"}], episode_timeout_s=1.0)([0], 2, 0, faults)
    assert len(batch) == 0 and faults.episodes_dropped == 2
    expected = "made no call" if entry == "silent" else "ran past episode_timeout_s=1"
    assert expected in faults.examples[0]


def test_a_plain_def_agent_runs_in_a_thread_with_the_synchronous_client(tmp_path, policy):
    faults = FaultLog()
    batch, _ = player(tmp_path, policy, "plain", [{"name": "x"}])([0, 0], 3, 0, faults)
    assert faults.episodes_dropped == 0 and len(batch) == 6 and batch.won.all()


@pytest.mark.slow
def test_the_frozenlake_example_agent_trains_from_the_command_line(tmp_path, policy):
    """``python -m grpo_lab.train env=agent`` with the shipped multi-turn example (GiGPO
    on its anchors): three steps, every call a row, later calls extending earlier ones."""
    model, tok = policy
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "grpo_lab.train", "env=agent", "algo=gigpo",
           "env.kwargs.entry=examples.agents.frozenlake_agent:run",
           "env.kwargs.tasks=examples/agents/frozenlake_tasks.jsonl", f"model.name_or_path={tmp_path / 'policy'}",
           "trainer.total_steps=3", "trainer.tasks_per_step=2", "algo.group_size=4", "trainer.eval_episodes=2",
           "rollout.max_new_tokens=8", "logger.wandb=false", "logger.progress_bar=false", f"trainer.output_dir={out}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert r["num_rows"] == r["agent_calls"] > r["episodes"] == 8 and r["agent_calls_extending"] > 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_final"]["episodes"] == 2 and (out / "final_model" / "config.json").exists()


def search_episode(tmp_path, entry: str, final: str):
    """One episode of a shipped search agent (``entry``) on the first search task, against
    a backend that replays a model's answers (a random model writes no tool call): a
    search call, then ``final``. Its batch and the rollout's stats."""
    sys.path.insert(0, str(REPO))
    from test_serve import ScriptedBackend

    tok = chat_tokenizer("qwen2.5_tools")
    task = json.loads((REPO / "examples/agents/search_tasks.jsonl").read_text().splitlines()[0])
    call = '<tool_call>\n{"name": "search", "arguments": {"query": "Quimir Kaul born"}}\n</tool_call><|im_end|>'
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(task) + "\n")
    tasks = AgentTasks(entry=entry, tasks=str(path))
    backend = ScriptedBackend(tok, [call, f"{final.format(**task)}<|im_end|>"])
    faults = FaultLog()
    batch, stats = tasks.episode_player(backend, tok, ServeSettings(model="policy", max_tokens=256,
                                                                    fixed_sampling=True))([0], 1, 0, faults)
    assert faults.episodes_dropped == 0, faults.examples
    return batch, stats, tok


def test_the_search_example_calls_its_tool_and_is_rewarded_for_the_exact_answer(tmp_path):
    """The shipped tool-calling agent: it searches, gets the passages, answers; two rows,
    the second extending the first by the tool's result, reward 1 for the gold answer
    and 0 for another."""
    returns = []
    for final in ("{answer}", "Nowhere."):
        batch, stats, tok = search_episode(tmp_path, "examples.agents.search_agent:run", final)
        assert len(batch) == 2 and stats["agent_calls_extending"] == 0.5
        returns += batch.trajectory_returns().tolist()
    assert returns == [1.0, 0.0]
    from examples.agents.search_agent import search

    tool_turn = tok(f"<|im_start|>user\n<tool_response>\n{search('Quimir Kaul born')}\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert batch.prompt_ids[1].tolist()[-len(tool_turn):] == tool_turn


def test_the_langgraph_example_trains_through_the_same_endpoint(tmp_path):
    """LangGraph's ReAct graph over ``ChatOpenAI``, unchanged: its tool call and its answer
    are two rows, the second extending the first, rewarded 1 for the gold answer."""
    pytest.importorskip("langgraph")
    pytest.importorskip("langchain_openai")
    batch, stats, _ = search_episode(tmp_path, "examples.agents.langgraph_agent:run", "{answer}")
    assert len(batch) == 2 and batch.trajectory_returns().tolist() == [1.0]
    assert stats["agent_calls_extending"] == 0.5
