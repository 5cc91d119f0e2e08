"""A fault costs its episode, never the rollout: environments that raise, hang, die or
return NaN; groups that lose members; prompts longer than the context; the registry."""

from __future__ import annotations

import time

import pytest
import torch
from test_scheduler import HashBackend, TickStream, assert_same_batch

from fault_envs import Corridor
from grpo_lab import envs as envs_pkg
from grpo_lab.envs import FrozenLakeEnv, get_env_factory, make_env, register_env, unregister_env
from grpo_lab.rollout import AgentLoopConfig, PromptEncoder, SamplingParams, SchedulerConfig, run_episodes, run_scheduled
from grpo_lab.rollout.agent_loop import OverlongPromptError
from grpo_lab.rollout.env_pool import EnvFault, EnvRunner, EnvSpec
from grpo_lab.rollout.faults import FaultLog
from grpo_lab.rollout.tree import TreeSamplerConfig, sample_trees

SEEDS = [0, 1, 2, 5, 4]  # starts 0, 1, 2, 2, 1


def config(G=4, **kw):
    return AgentLoopConfig(group_size=G, max_steps=6, history_window=1, sampling=SamplingParams(max_tokens=12),
                           request_seed=7, **kw)


def corridor(**faults):
    return EnvSpec("corridor", Corridor, faults)


def trajectories(batch):
    return sorted(set(batch.traj_id.tolist()))


# ---------------------------------------------------------------------- registry
def test_register_env_plugs_in_a_name_and_refuses_a_duplicate():
    register_env("corridor_test", Corridor)
    try:
        assert isinstance(make_env("corridor_test"), Corridor)
        with pytest.raises(ValueError, match="already registered"):
            register_env("corridor_test", Corridor)
        from grpo_lab.config import EnvConfig

        EnvConfig(name="corridor_test").validate()
    finally:
        unregister_env("corridor_test")
    with pytest.raises(ValueError, match="unknown environment 'corridor_test'; valid names: .*frozenlake"):
        get_env_factory("corridor_test")


def test_register_env_as_a_decorator_and_from_entry_points(monkeypatch):
    @register_env("decorated_test")
    class Decorated(FrozenLakeEnv):
        pass

    try:
        assert isinstance(make_env("decorated_test"), Decorated)
    finally:
        unregister_env("decorated_test")

    import importlib.metadata

    ep = importlib.metadata.EntryPoint(name="plugin_test", value="fault_envs:Corridor", group="grpo_lab.envs")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [ep] if group == "grpo_lab.envs" else [])
    envs_pkg.ENVS.refresh_plugins()
    try:
        assert "plugin_test" in envs_pkg.env_names()
        assert envs_pkg.ENVS.registered("plugin_test").target == "fault_envs:Corridor"  # imported at first use, not at listing
        assert isinstance(make_env("plugin_test"), Corridor)
    finally:
        unregister_env("plugin_test")


# ---------------------------------------------------------------------- one environment
@pytest.mark.parametrize("workers", [0, 1])
def test_a_raising_step_and_a_nan_reward_become_faults_that_name_the_episode(workers):
    runner = EnvRunner(corridor(raise_at=[(0, 1)], nan_at=[(1, 1)]), workers=workers, step_timeout_s=30)
    try:
        env = runner()
        env.reset(0)
        env.step("right")
        with pytest.raises(EnvFault) as err:
            env.step("right")
        assert err.value.kind == "error" and err.value.seed == 0 and err.value.step == 1
        assert "RuntimeError: broken at (0, 1)" in str(err.value) and "more" not in str(err.value)
        env = runner()
        env.reset(1)
        with pytest.raises(EnvFault, match="nonfinite: reward nan") as err:
            env.step("right")
        assert err.value.kind == "nonfinite"
    finally:
        runner.close()


def test_a_hung_step_is_abandoned_and_its_neighbours_are_replayed_in_the_new_worker():
    """Property: one worker holds three environments; the hung one times out, the other
    two continue in the replacement worker exactly where they were."""
    runner = EnvRunner(corridor(hang_at=[(2, 3)]), workers=1, step_timeout_s=1.0)
    try:
        a, b, hung = runner(), runner(), runner()
        a.reset(0), b.reset(1), hung.reset(2)
        a.step("right"), b.step("wait"), hung.step("right")  # a at 1, b at 1, hung at 3
        t0 = time.perf_counter()
        with pytest.raises(EnvFault) as err:
            hung.step("right")
        assert err.value.kind == "timeout" and time.perf_counter() - t0 < 10
        assert runner.stats.workers_replaced == 1 and runner.stats.envs_replayed == 2 and runner.stats.replayed_steps == 2
        assert a.step("right").observation.anchor == ("corridor", 0, 2)
        assert b.step("right").observation.anchor == ("corridor", 1, 2)
        with pytest.raises(EnvFault, match="replaced"):
            hung.step("right")
    finally:
        runner.close()


def test_a_worker_that_dies_costs_only_its_episode():
    runner = EnvRunner(corridor(die_at=[(0, 0)]), workers=1, step_timeout_s=30)
    try:
        other, dying = runner(), runner()
        other.reset(1), dying.reset(0)
        with pytest.raises(EnvFault, match="worker process died"):
            dying.step("right")
        assert other.step("right").observation.anchor == ("corridor", 1, 2)
    finally:
        runner.close()


def test_a_factory_that_workers_cannot_import_is_refused_at_once():
    with pytest.raises(ValueError, match="cannot be sent to worker processes"):
        EnvRunner(EnvSpec("lambda", lambda: Corridor()), workers=1)


# ---------------------------------------------------------------------- episodes and groups
def test_failed_episodes_leave_the_batch_and_small_groups_go_with_them(tokenizer):
    """G=2: seed 0's reset raises (both members fail: group 0 is lost whole); a legal
    step of seed 2 from its start returns NaN (each member that takes one fails, and one
    failure leaves group 2 a single member, so it goes). The rest of the batch is the
    fault-free batch, row for row."""
    encoder = PromptEncoder(tokenizer)
    clean = run_episodes(HashBackend(tokenizer), encoder, Corridor, SEEDS, config(G=2))
    nan_hit = {t for t, a, v in zip(clean.traj_id.tolist(), clean.anchor, clean.valid_action.tolist())
               if a == ("corridor", 2, 2) and v}
    faults = FaultLog()
    batch = run_episodes(HashBackend(tokenizer), encoder, lambda: Corridor(reset_raises={0}, nan_at=[(2, 2)]), SEEDS,
                         config(G=2), faults=faults)
    lost_groups = {0} | ({2} if nan_hit else set())
    assert faults.episodes == 10 and faults.env_errors == 2 and faults.env_nonfinite_rewards == len(nan_hit)
    assert faults.episodes_dropped == 2 + len(nan_hit) and faults.groups_dropped == len(lost_groups)
    keep = torch.tensor([g not in lost_groups for g in clean.group_id.tolist()])
    assert_same_batch(batch, clean.select(keep.nonzero().flatten()))


def test_a_group_keeps_its_survivors_when_two_remain(tokenizer):
    """Property: with G=4, a fault that hits some members of a group removes exactly
    those trajectories when at least two others finish, and the whole group otherwise."""
    encoder = PromptEncoder(tokenizer)
    clean = run_episodes(HashBackend(tokenizer), encoder, Corridor, SEEDS, config())
    # the members of seed 0 that step from position 1 fail there; find them in the clean batch
    hit = {t for t, g, a in zip(clean.traj_id.tolist(), clean.group_id.tolist(), clean.anchor) if a == ("corridor", 0, 1)}
    faults = FaultLog()
    batch = run_episodes(HashBackend(tokenizer), encoder, lambda: Corridor(raise_at=[(0, 1)]), SEEDS, config(), faults=faults)
    survivors = {t for t in clean.traj_id[clean.group_id == 0].tolist()} - hit
    assert faults.env_errors == len(hit) >= 1
    if len(survivors) >= 2:
        assert set(batch.traj_id[batch.group_id == 0].tolist()) == survivors and faults.groups_dropped == 0
    else:
        assert 0 not in batch.group_id.tolist() and faults.groups_dropped == 1
    assert set(trajectories(batch)) == set(trajectories(clean)) - hit - (set() if len(survivors) >= 2 else survivors)


@pytest.mark.parametrize("mode", ["micro", "continuous"])
def test_schedulers_drop_the_same_episodes_as_the_lock_step_loop(tokenizer, mode):
    """Property: under faults (a raise, a NaN, a failed reset) every scheduler returns the
    lock-step loop's batch and counts."""
    encoder = PromptEncoder(tokenizer)
    env = lambda: Corridor(raise_at=[(1, 1)], nan_at=[(5, 3)], reset_raises={4})  # noqa: E731
    f_plain, f_sched = FaultLog(), FaultLog()
    plain = run_episodes(HashBackend(tokenizer), encoder, env, SEEDS, config(), first_group_id=3, faults=f_plain)
    batch, _ = run_scheduled(TickStream(HashBackend(tokenizer)), encoder, env, SEEDS, config(),
                             SchedulerConfig(mode=mode, max_inflight=6, micro_group_size=2, env_workers=2),
                             first_group_id=3, faults=f_sched)
    assert_same_batch(batch, plain)
    assert f_plain.metrics() == f_sched.metrics() and f_plain.episodes == f_sched.episodes == 20
    assert f_plain.env_errors >= 4 and f_plain.env_nonfinite_rewards >= 1


def test_worker_processes_give_the_in_process_batch_and_survive_a_hang(tokenizer):
    """Property: environments in worker processes give exactly the in-process episodes;
    a hang costs its episode and the timeout, nothing else."""
    encoder = PromptEncoder(tokenizer)
    spec = corridor(hang_at=[(2, 3)], raise_at=[(1, 1)])
    f_local, f_remote = FaultLog(), FaultLog()
    # in process, the hang would hang: the local run gets a raise where the remote one hangs
    expected = run_episodes(HashBackend(tokenizer), encoder,
                            lambda: Corridor(raise_at=[(2, 3), (1, 1)]), SEEDS, config(), faults=f_local)
    remote = EnvRunner(spec, workers=2, step_timeout_s=1.0)
    try:
        batch = run_episodes(HashBackend(tokenizer), encoder, remote, SEEDS, replace_threads(config(), 2), faults=f_remote)
    finally:
        remote.close()
    assert_same_batch(batch, expected)
    assert f_remote.env_timeouts >= 1
    assert f_remote.env_timeouts + f_remote.env_errors == f_local.env_errors
    assert remote.stats.workers_replaced == f_remote.env_timeouts


def replace_threads(cfg, n):
    from dataclasses import replace

    return replace(cfg, env_threads=n)


def test_a_tree_with_a_failed_branch_is_dropped_whole(tokenizer):
    import random

    encoder = PromptEncoder(tokenizer)
    tree = TreeSamplerConfig(trees_per_prompt=2, rounds=1, nodes_per_round=2)
    clean, _ = sample_trees(HashBackend(tokenizer), encoder, Corridor, SEEDS, config(), tree, random.Random(0))
    faults = FaultLog()
    batch, _ = sample_trees(HashBackend(tokenizer), encoder, lambda: Corridor(raise_at=[(0, 1)]), SEEDS, config(), tree,
                            random.Random(0), faults=faults)
    assert faults.env_errors >= 1 and faults.episodes >= len(SEEDS) * tree.trees_per_prompt
    seed0_trees = set(range(tree.trees_per_prompt))  # group 0 (seed 0) holds trees 0 and 1
    assert not seed0_trees <= set(batch.tree_id.tolist())  # at least one of them failed and is gone
    assert set(batch.group_id.tolist()) >= {1, 2, 3, 4}  # other prompts are untouched
    for t in set(batch.tree_id.tolist()):  # every surviving tree is whole: nodes 0..n-1, leaves included
        nodes = sorted(batch.node_id[batch.tree_id == t].tolist())
        assert nodes == list(range(len(nodes))) and batch.done[batch.tree_id == t].any()
    for g in set(batch.group_id.tolist()):  # every prompt left holds at least two leaves
        assert int((batch.done & (batch.group_id == g)).sum()) >= 2
    assert len(clean) > len(batch)


# ---------------------------------------------------------------------- context length
def long_corridor():
    return Corridor(pad_words=400, pad_at=[(1, 2), (2, 2), (5, 2)])  # long observations at position 2


@pytest.mark.parametrize("policy", ["truncate_history", "drop_episode"])
def test_an_overlong_prompt_is_never_sent(tokenizer, policy):
    """Property: no request's prompt plus max_tokens passes the context; what does not
    fit is truncated or dropped, and counted."""
    encoder = PromptEncoder(tokenizer)
    short = len(encoder.encode("x " * 60))
    limit = short + 40

    class Recorder(HashBackend):
        def generate(self, prompts, params):
            for p, sp in zip(prompts, params):
                assert len(p) + sp.max_tokens <= limit
            return super().generate(prompts, params)

    faults = FaultLog()
    cfg = config(max_context=limit, overlong=policy)
    batch = run_episodes(Recorder(tokenizer), encoder, long_corridor, SEEDS, cfg, faults=faults)
    assert faults.overlong_dropped >= 1  # 400 words never fit, even without history
    assert all(len(p) < limit for p in batch.prompt_ids)
    assert all(("corridor", s, 2) not in batch.anchor for s in (1, 2, 5))


def test_truncate_history_drops_the_oldest_turns_first(tokenizer):
    """Hand-worked: window 3, a context that holds the observation and one past turn:
    the prompt shows exactly the newest turn."""
    from grpo_lab.rollout.formats import fit_prompt
    from grpo_lab.rollout.prompts import Turn, render_prompt

    encoder = PromptEncoder(tokenizer)
    history = [Turn("at 0 " + "far " * 30, "right"), Turn("at 1 " + "far " * 30, "right"), Turn("at 2", "wait")]
    one = encoder.encode(render_prompt("Reach 4.", history, "at 2", 1))
    two = encoder.encode(render_prompt("Reach 4.", history, "at 2", 2))
    cfg = AgentLoopConfig(history_window=3, max_context=len(two), overlong="truncate_history")
    faults = FaultLog()
    assert fit_prompt(encoder, "Reach 4.", history, "at 2", cfg, ("corridor", 0, 3), faults) == one
    assert faults.overlong_truncated == 1


def test_overlong_error_names_the_episode_and_the_fix(tokenizer):
    encoder = PromptEncoder(tokenizer)
    cfg = config(max_context=60, overlong="error")
    with pytest.raises(OverlongPromptError, match=r"env 'Corridor' seed 1 step 1: the prompt has \d+ tokens.*overlong_prompt"):
        run_episodes(HashBackend(tokenizer), encoder, lambda: Corridor(pad_words=400, pad_at=[(1, 2)]), [1], cfg)


def test_max_tokens_is_capped_to_the_room_left():
    cfg = AgentLoopConfig(sampling=SamplingParams(max_tokens=16), max_context=100)
    assert cfg.params_for(0, 0, 90).max_tokens == 10 and cfg.params_for(0, 0, 50).max_tokens == 16


def test_the_hf_backend_takes_requests_capped_to_the_room_left(tiny_model, tokenizer):
    """Prompts near the context get a smaller max_tokens than the others in the same
    turn; the HF backend generates both, each within its own cap."""
    from grpo_lab.rollout import HFBackend
    from grpo_lab.rollout.prompts import render_prompt

    encoder = PromptEncoder(tokenizer)
    env = lambda: Corridor(pad_words=30, pad_at=[(2, 2)])  # noqa: E731  seed 2 starts on a long observation
    long_prompt = encoder.encode(render_prompt(Corridor.instruction, [], env().reset(2).text, 1))
    cfg = AgentLoopConfig(group_size=2, max_steps=1, history_window=1, sampling=SamplingParams(max_tokens=12),
                          max_context=len(long_prompt) + 4)
    faults = FaultLog()
    batch = run_episodes(HFBackend(tiny_model, tokenizer), encoder, env, [0, 2], cfg, faults=faults)
    assert faults.episodes_dropped == 0 and len(batch) == 4
    for prompt, response in zip(batch.prompt_ids, batch.response_ids):
        assert len(prompt) + len(response) <= cfg.max_context
    assert max(len(r) for r, g in zip(batch.response_ids, batch.group_id.tolist()) if g == 1) <= 4
