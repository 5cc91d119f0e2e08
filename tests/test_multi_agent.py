"""Multi-agent episodes (the planner and executor of ``search_team``): the environment's
roles and invocations, the rows the turn loop makes of them (each role's own instruction
and turns in its prompt, role and invocation columns), the format warm-up per role, and a
shared-weights training run with M-GRPO's advantages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grpo_lab.envs import make_env
from grpo_lab.envs.search_team import EXECUTOR, PLANNER


def test_the_environment_hands_turns_between_its_roles():
    env = make_env("search_team", max_delegations=1, max_searches=1)
    obs = env.reset(4)
    assert (obs.role, obs.invocation) == (0, -1) and obs.text.startswith("Question:")
    bad = env.step("<search>x</search>")  # the planner cannot search
    assert not bad.info["valid_action"] and bad.observation == obs
    obs = env.step("<delegate>who is it</delegate>").observation
    assert (obs.role, obs.invocation) == (1, 0) and obs.text.startswith("Sub-question: who is it")
    assert env.step("<search>born</search>").info["valid_action"]
    assert not env.step("<search>again</search>").info["valid_action"]  # max_searches=1
    obs = env.step("<answer>Kalo</answer>").observation
    assert obs.role == 0 and "- who is it -> Kalo" in obs.text
    assert not env.step("<delegate>more</delegate>").info["valid_action"]  # max_delegations=1
    gold = env.questions[env.qid][1][0]
    last = env.step(f"<answer>{gold}</answer>")
    assert last.done and last.reward == 1.0 and last.info["won"]


def test_rows_carry_role_and_invocation_and_each_role_sees_its_own_prompt(tmp_path):
    from grpo_lab.train import compose_config
    from grpo_lab.trainer import Trainer

    config = compose_config(["env=search_team", "algo=mgrpo", "algo.group_size=3", "trainer.tasks_per_step=2",
                             "model.tiny_hidden_size=32", "model.tiny_num_heads=1", "model.tiny_num_kv_heads=1",
                             "model.tiny_num_layers=1", "logger.wandb=false"])
    trainer = Trainer(config, output_dir=tmp_path)
    tokenizer = trainer.parts.tokenizer
    # scripted answers: delegate, search, answer (hop), answer (final), whatever the model would say
    script = {0: "<delegate>where was the person born</delegate>", 1: "<search>born</search>",
              2: "<answer>Kalo</answer>", 3: "<answer>Kalo</answer>"}
    backend = trainer.parts.backend
    real_generate = backend.generate

    def scripted(prompts, params):
        out = real_generate(prompts, params)
        for comp, prompt in zip(out, prompts):
            text = tokenizer.decode(prompt).split("Now:")[-1]  # the current observation, not the past turns
            step = 0 if "Findings:\nnothing yet" in text else 1 if "No search yet" in text else (
                2 if "Results for" in text else 3)
            ids = tokenizer(script[step], add_special_tokens=False)["input_ids"]
            comp.token_ids, comp.logprobs, comp.text = ids, [0.0] * len(ids), script[step]
        return out

    backend.generate = scripted
    batch = trainer.collect(0)
    assert batch.role.tolist().count(1) == 2 * len(torch.unique(batch.traj_id))  # search and hop answer, per episode
    for i in range(len(batch)):
        prompt = tokenizer.decode(batch.prompt_ids[i])
        role, invocation = int(batch.role[i]), int(batch.invocation[i])
        assert (PLANNER if role == 0 else EXECUTOR).split(".")[0] in prompt
        assert invocation == (-1 if role == 0 else 0)
        if role == 1:
            assert "Question:" not in prompt  # the executor sees its sub-question, not the planner's turns
    adv = trainer.advantages(batch)
    assert adv.advantages.shape == (len(batch),) and "mgrpo_units_duplicated" in adv.metrics


def test_the_format_warm_up_writes_each_roles_prompt():
    from grpo_lab.rollout.demonstrations import format_demonstrations

    pairs = list(format_demonstrations(lambda: make_env("search_team"), 12, 8, 2, seed=1))
    executor = [(p, a) for p, a in pairs if p.startswith(EXECUTOR)]
    planner = [(p, a) for p, a in pairs if p.startswith(PLANNER)]
    assert executor and planner and len(executor) + len(planner) == len(pairs)
    assert all(a.startswith(("<search>", "<answer>")) for _, a in executor)
    assert all(a.startswith(("<delegate>", "<answer>")) for _, a in planner)
    assert all("Findings:" not in p for p, _ in executor)


@pytest.mark.slow
def test_shared_weights_training_with_mgrpo(tmp_path):
    from training_runs import SMALL_RUN, train_rows

    rows = train_rows(tmp_path / "run", ["env=search_team", "algo=mgrpo", "algo.group_size=4", "trainer.total_steps=2",
                                         "trainer.tasks_per_step=2", *SMALL_RUN])
    assert len(rows) == 2 and all(r["num_rows"] > 0 for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert all("mgrpo_units_duplicated" in r for r in rows)


def test_a_black_box_two_role_agent_through_the_endpoint(tmp_path):
    """The real openai client addresses the roles by ``model``: each call's row has its
    role; an executor call that extends its own conversation stays in its invocation, a
    new conversation opens the next; the planner's second call extends the planner's
    first (not the executor's calls between); the episode's reward lands on the planner's
    last call; an unknown model is a 404 naming the roles."""
    import openai

    from chat_templates import chat_tokenizer
    from grpo_lab.endpoint.agents import AgentTasks
    from grpo_lab.endpoint.app import ServeSettings
    from grpo_lab.endpoint.server import Endpoint
    from grpo_lab.modeling import build_tiny_model
    from grpo_lab.rollout.backends.hf import HFBackend
    from grpo_lab.rollout.faults import FaultLog

    tok = chat_tokenizer("chatml")
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=64, seed=0)
    settings = ServeSettings(model="policy", max_tokens=4, max_context=400, fixed_sampling=True,
                             roles=("planner", "executor"))
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"name": "a", "hops": 2, "reward": 1.0}) + "\n")
    play = AgentTasks(entry="agent_fixtures:planner_executor", tasks=str(path)).episode_player(
        HFBackend(model, tok), tok, settings)
    batch, _ = play([0], 2, 0, FaultLog())
    for traj in torch.unique(batch.traj_id).tolist():
        idx = [i for i, t in enumerate(batch.traj_id.tolist()) if t == traj]
        assert batch.role[idx].tolist() == [0, 1, 1, 1, 1, 0]
        assert batch.invocation[idx].tolist() == [-1, 0, 0, 1, 1, -1]
        assert batch.reward[idx].tolist() == [0.0] * 5 + [1.0]
        first, last = idx[0], idx[-1]
        head = [*batch.prompt_ids[first].tolist(), *batch.response_ids[first].tolist()]
        assert batch.prompt_ids[last].tolist()[: len(head)] == head  # the planner's own conversation, extended
    endpoint = Endpoint.start(HFBackend(model, tok), tok, settings)
    try:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.sessions.run_key)
        assert [m.id for m in client.models.list().data] == ["policy", "planner", "executor"]
        with pytest.raises(openai.NotFoundError, match="the roles \\['planner', 'executor'\\]"):
            client.chat.completions.create(model="critic", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        endpoint.stop()


def test_endpoint_invocations_follow_conversations_not_call_order():
    """Two executor conversations A and B interleaved (A1, B1, A2): A2 continues A's
    invocation, found among all of the role's calls; a completions-API executor call whose
    prompt starts with an earlier call's prompt and answer continues its invocation."""
    from grpo_lab.endpoint.chat import CapturedCall, EpisodeCapture, tools_key
    from grpo_lab.rollout.backend import Completion

    capture = EpisodeCapture()

    def chat_call(messages, answer, extends=False):
        keys = tuple(("user", m) for m in messages)
        prev = capture.continued(keys, None, 1)
        call = CapturedCall(keys, tools_key(None), [1, 2], Completion([3], [0.0]), ("assistant", answer), extends, role=1,
                            invocation=prev.invocation if prev is not None else -1)
        capture.record(call)
        return call

    a1 = chat_call(["task A"], "a1")
    b1 = chat_call(["task B"], "b1")
    a2 = CapturedCall((("user", "task A"), ("assistant", "a1"), ("user", "more")), tools_key(None), [1, 2, 3, 4],
                      Completion([5], [0.0]), ("assistant", "a2"), True, role=1,
                      invocation=capture.continued((("user", "task A"), ("assistant", "a1"), ("user", "more")), None,
                                                   1).invocation)
    capture.record(a2)
    assert (a1.invocation, b1.invocation, a2.invocation) == (0, 1, 0)
    later = capture.continued_by_tokens([1, 2, 3, 9, 9], 1)
    assert later is b1 or later is a1  # the newest call whose prompt and answer [1, 2, 3] it starts with
    assert capture.continued_by_tokens([7, 7], 1) is None


def test_the_runtime_refuses_a_multi_agent_env_where_it_cannot_render_roles():
    from grpo_lab.rollout.agent_loop import AgentLoopConfig, episode_prompt
    from grpo_lab.rollout.episode import Episode

    env = make_env("search_team")
    ep = Episode(env, 0, 0, env.reset(0))
    with pytest.raises(ValueError, match="conversation episode format keeps one agent's"):
        episode_prompt(ep, None, AgentLoopConfig(episode_format="conversation"))
    from grpo_lab.envs.base import Observation

    ep.obs = Observation("x", "a", role=1, invocation=-1)
    with pytest.raises(ValueError, match="role 1 with invocation -1"):
        episode_prompt(ep, None, AgentLoopConfig())
