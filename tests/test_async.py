"""Training while the engines generate (``trainer.async``): the staleness bound, the
rows' policy versions and their off-policy weighting, the router over engines, and a
resume that neither loses nor repeats an episode in flight.

The runs here serve the engine from a thread of the test's process (the endpoint that
``python -m grpo_lab.serve`` runs, on a copy of the trainer's model) and reach it over
HTTP at ``rollout.engine_urls``, with weights pushed over a gloo group: the same code as
engines in their own processes (``tests/test_engines.py`` starts those), started faster."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from fault_envs import SigtermLake
from grpo_lab.config import (AlgoConfig, Config, ConfigError, EnvConfig, LoggerConfig, ModelConfig, RolloutConfig,
                             TrainerConfig, WarmupConfig)
from grpo_lab.data import RolloutBatch
from grpo_lab.envs import env_names, register_env
from grpo_lab.rollout.backend import EngineError
from grpo_lab.rollout.backends.router import Router
from grpo_lab.rollout.backends.weight_stream import free_port
from grpo_lab.rollout.faults import FaultLog
from grpo_lab.trainer import Trainer
from grpo_lab.training.async_rollout import Collected, RolloutAhead, mark_stale
from grpo_lab.training.stop import TrainingInterrupted
from grpo_lab.training.update import PolicyUpdate

if "sigterm_lake" not in env_names():
    register_env("sigterm_lake", SigtermLake)

KEY = "sk-async-test"


# ---------------------------------------------------------------------- the bound
def rows(n: int, versions: list[int]) -> RolloutBatch:
    return RolloutBatch(group_id=[0] * n, traj_id=list(range(n)), step=[0] * n, prompt_ids=[[1, 2]] * n,
                        response_ids=[[3]] * n, rollout_logprobs=[[-0.5]] * n, loss_mask=[[1.0]] * n, reward=[0.0] * n,
                        done=[True] * n, valid_action=[True] * n, anchor=[0] * n, policy_version=versions)


def test_rows_older_than_the_trained_version_are_off_policy_and_their_staleness_is_counted():
    """Versions [5, 4, 2, -1] trained at version 5: staleness 0, 1, 3 and (unknown) 0;
    the second and third rows are off-policy; mean 4/4 = 1, max 3, share 2/4."""
    batch = rows(4, [5, 4, 2, -1])
    metrics = mark_stale(batch, 5)
    assert batch.off_policy.tolist() == [False, True, True, False]
    assert metrics == {"staleness_mean": 1.0, "staleness_max": 3.0, "stale_rows_frac": 0.5}


class Recorder:
    """A rollout function that records the version the engines served when each rollout
    began, and takes ``seconds`` per rollout."""

    def __init__(self, ahead_of: list, seconds: float = 0.0, fail_at: int | None = None) -> None:
        self.ahead_of, self.seconds, self.fail_at, self.began = ahead_of, seconds, fail_at, {}
        self.state = {"draws": 0}

    def __call__(self, step):
        self.began[step] = self.ahead_of[0].version
        self.state["draws"] += 1
        if step == self.fail_at:
            raise EngineError(f"engine http://127.0.0.1:1/v1: ConnectError at step {step}")
        time.sleep(self.seconds)
        return rows(1, [self.ahead_of[0].version]), {"rollout_step": step}, FaultLog()


@pytest.mark.parametrize("k", [0, 1, 3])
def test_a_rollout_starts_only_within_the_staleness_bound(k):
    """The rollout of step t begins once version t - k is published, never earlier; with
    k = 0 only after the previous step's push (the synchronous order)."""
    box: list = []
    produce = Recorder(box)
    ahead = RolloutAhead(produce, lambda: dict(produce.state), 0, 8, k, version=0)
    box.append(ahead)
    ahead.start()
    for step in range(8):
        item, _ = ahead.take(step)
        assert item.step == step and item.stats == {"rollout_step": step}
        time.sleep(0.01)  # the trainer's update: the thread may run ahead meanwhile
        assert max(produce.began) <= step + k  # nothing beyond the bound has begun
        ahead.done(step)
        ahead.publish(step + 1)
    ahead.stop()
    assert all(produce.began[t] >= t - k for t in range(8))
    if k == 0:
        assert produce.began == {t: t for t in range(8)}


def test_the_checkpoint_keeps_finished_rollouts_and_replays_the_one_under_way():
    """With k = 2 after step 0 is trained: the rollouts of steps 1 and 2 are finished and
    kept; step 3's is under way, so the state before it is saved to replay it; replaying
    from step 1 (a refused rollout) keeps none and saves the state before step 1."""
    box: list = []
    gate = threading.Event()
    produce = Recorder(box)

    def slow_third(step):
        if step == 3:
            gate.wait(10)
        return produce(step)

    ahead = RolloutAhead(slow_third, lambda: dict(produce.state), 0, 6, 2, version=0)
    box.append(ahead)
    ahead.start()
    ahead.take(0)
    ahead.done(0)
    ahead.publish(1)
    deadline = time.monotonic() + 10
    while (2 not in ahead.ready or ahead.started is None) and time.monotonic() < deadline:
        time.sleep(0.01)
    state = ahead.state(0)
    assert [c.step for c in state["pending"]] == [1, 2]
    assert state["draws"] == 3  # before step 3's rollout: steps 0, 1 and 2 had drawn
    replay = ahead.state(0, replay_from=1)
    assert replay["pending"] == [] and replay["draws"] == 1  # before step 1's rollout
    gate.set()
    ahead.stop()


def test_saved_rollouts_are_trained_first_and_a_rollout_error_reaches_the_trainer():
    box: list = []
    produce = Recorder(box, fail_at=4)
    saved = [Collected(2, rows(1, [1])), Collected(3, rows(1, [2]))]
    ahead = RolloutAhead(produce, lambda: {}, 2, 6, 1, version=3, pending=saved)
    box.append(ahead)
    ahead.start()
    assert ahead.take(2)[0] is saved[0] and ahead.take(3)[0] is saved[1]
    with pytest.raises(EngineError, match="ConnectError at step 4"):
        ahead.take(4)
    assert 2 not in produce.began and 3 not in produce.began
    with pytest.raises(ValueError, match="steps \\[2, 4\\]"):
        RolloutAhead(produce, lambda: {}, 2, 6, 1, version=3, pending=[saved[0], Collected(4, rows(1, [1]))])


# ---------------------------------------------------------------------- the router
def test_the_router_keeps_a_prompt_on_its_engine_and_balances_new_ones():
    router = Router(["a", "b"])
    first = router.acquire([1, 2, 3])
    assert first == "a"
    assert router.acquire([1, 2, 3]) == "a"  # a group's second member: the same engine, busy or not
    assert router.acquire([9]) == "b"  # a new prompt: the less loaded
    router.release("a"), router.release("a")
    assert router.acquire([7]) == "a"
    router.mark_down("a")
    assert router.acquire([1, 2, 3]) == "b"  # its engine is down
    with pytest.raises(EngineError, match="no engine is up"):
        router.acquire([5], avoid=["b"])
    router.replace("a", "c")
    assert "c" in router.urls and router.acquire([4]) == "c"


# ---------------------------------------------------------------------- config
def test_async_is_refused_without_engines_and_read_from_its_command_line_name():
    from grpo_lab.train import compose_config

    with pytest.raises(ConfigError, match="trainer.async"):
        compose_config(["trainer.async=true"])
    config = compose_config(["trainer.async=true", "rollout.engine_urls=[http://h:1/v1]", "rollout.engine_api_key=k",
                             "rollout.max_staleness=2"])
    assert config.trainer.async_rollout and config.rollout.max_staleness == 2
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        compose_config(["rollout.max_staleness=-1"])


# ---------------------------------------------------------------------- runs
def run_config(port: int, total_steps: int = 3, env: str = "frozenlake", **trainer) -> Config:
    return Config(
        algo=AlgoConfig(group_size=4),
        env=EnvConfig(name=env, max_steps=4),
        model=ModelConfig(tiny_hidden_size=64, tiny_num_heads=1, tiny_num_kv_heads=1, tiny_intermediate_size=128),
        rollout=RolloutConfig(env_workers=0, request_seeds=True, engine_urls=[f"http://127.0.0.1:{port}/v1"],
                              engine_api_key=KEY, engine_timeout_s=120),
        trainer=TrainerConfig(**{"total_steps": total_steps, "tasks_per_step": 4, "eval_episodes": 4, "lr": 1e-3,
                                 "save_final": False,
                                 "warmup": WarmupConfig(steps=10, batch_size=16, episodes=30), **trainer}),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )


class Engine:
    """An endpoint on a copy of ``trainer``'s model at ``port`` (one request per
    ``generate``: its samples do not depend on what else arrived with it)."""

    def __init__(self, trainer: Trainer, port: int) -> None:
        from grpo_lab.endpoint.app import ServeSettings
        from grpo_lab.endpoint.server import Endpoint
        from grpo_lab.rollout.backends.hf import HFBackend

        backend = HFBackend(copy.deepcopy(trainer.model), trainer.tokenizer, max_batch_size=1)
        self.endpoint = Endpoint.start(backend, trainer.tokenizer, ServeSettings(model="policy", max_tokens=64),
                                       port=port, api_key=KEY)

    def stop(self) -> None:
        self.endpoint.stop()


def train_with_engine(config: Config, out: Path, trained: list | None = None):
    """Run ``config`` against an engine of its own; ``trained`` collects each update's rows."""
    trainer = Trainer(config, output_dir=out)
    engine = Engine(trainer, int(config.rollout.engine_urls[0].rsplit(":", 1)[1].split("/")[0]))
    try:
        return trainer, trainer.train()
    finally:
        engine.stop()


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_max_staleness_zero_is_the_synchronous_run_step_for_step(tmp_path):
    """``trainer.async=true rollout.max_staleness=0`` against the synchronous run on the
    same engine setup: the same losses, rewards, success and gradient norms at every
    step, and no row off-policy."""
    sync_port, async_port = free_port(), free_port()
    _, sync = train_with_engine(run_config(sync_port, seed=3), tmp_path / "sync")
    config = run_config(async_port, seed=3, async_rollout=True)
    config.rollout.max_staleness = 0
    _, asynchronous = train_with_engine(config, tmp_path / "async")
    a, b = metrics(tmp_path / "sync"), metrics(tmp_path / "async")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        for key in ("reward_mean", "success_rate", "num_rows", "response_tokens", "loss", "grad_norm"):
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))
        assert rb["staleness_max"] == 0 and rb["stale_rows_frac"] == 0
    assert sync["eval_final"] == asynchronous["eval_final"]


@pytest.mark.slow
def test_one_step_ahead_trains_stale_rows_off_policy_within_the_bound(tmp_path, monkeypatch):
    """k = 1: rollouts run during the previous update, so later steps train rows one
    version old, weighted off-policy; none is older than the bound."""
    seen = []
    original = PolicyUpdate.__call__

    def recording(self, batch, advantages, extras=None):
        seen.append((batch.policy_version.clone(), batch.off_policy.clone()))
        time.sleep(2.0)  # an update that takes longer than a rollout, as on a real model
        return original(self, batch, advantages, extras)

    monkeypatch.setattr(PolicyUpdate, "__call__", recording)
    config = run_config(free_port(), total_steps=4, async_rollout=True)
    train_with_engine(config, tmp_path / "run")
    records = metrics(tmp_path / "run")
    assert all(r["staleness_max"] <= 1 for r in records)
    for step, (versions, off_policy) in enumerate(seen):
        assert bool(((step - versions) <= 1).all()) and bool((versions <= step).all())
        assert off_policy.tolist() == (versions < step).tolist()
    assert any(r["stale_rows_frac"] > 0 for r in records[1:])


@pytest.mark.slow
def test_sigterm_with_rollouts_in_flight_then_resume_trains_every_episode_once(tmp_path, monkeypatch):
    """k = 2, SIGTERM in the middle of step 3's rollout, made while step 1 trains: the
    run stops after the step in progress; its checkpoint keeps the finished rollouts of
    the steps after it and replays the one under way, so the resumed run trains the same episodes (group, member and task) as a
    run that went through, none twice."""
    trained: list[tuple] = []
    original = PolicyUpdate.__call__

    def recording(self, batch, advantages, extras=None):
        for i in range(len(batch)):
            if int(batch.step[i]) == 0:
                trained.append((int(batch.group_id[i]), int(batch.traj_id[i]), tuple(batch.prompt_ids[i].tolist())))
        time.sleep(1.0)  # an update longer than a rollout: the rollouts run ahead, up to the bound
        return original(self, batch, advantages, extras)

    monkeypatch.setattr(PolicyUpdate, "__call__", recording)
    starts = SigtermLake.steps_at_each_rollout(monkeypatch)

    def cfg(port, **kw):
        c = run_config(port, total_steps=5, env="sigterm_lake", async_rollout=True, **kw)
        c.rollout.max_staleness = 2
        c.trainer.warmup = WarmupConfig(steps=40, batch_size=16, episodes=60)  # valid actions reach the environment
        return c

    SigtermLake.ARMED, SigtermLake.steps_taken = 0, 0
    train_with_engine(cfg(free_port()), tmp_path / "whole")
    whole, trained[:] = list(trained), []
    assert starts[4] - starts[3] >= 2  # step 3's rollout steps the environment
    SigtermLake.ARMED, SigtermLake.steps_taken = (starts[3] + starts[4]) // 2, 0
    try:
        with pytest.raises(TrainingInterrupted) as err:
            train_with_engine(cfg(free_port()), tmp_path / "split")
    finally:
        SigtermLake.ARMED = 0
    last = err.value.last_step
    assert last in (1, 2)  # the signal lands during step 1's update, or step 2's on a slow machine
    state = torch.load(tmp_path / "split" / "checkpoints" / f"step_{last:06d}" / "trainer_state.pt", weights_only=False)
    kept = [c.step for c in state["ranks"][0]["pending"]]
    assert kept == list(range(last + 1, last + 1 + len(kept)))  # finished and untrained, in order
    assert set(range(last + 1, 3)) <= set(kept)  # the rollouts before step 3's had all ended
    first, trained[:] = list(trained), []
    train_with_engine(cfg(free_port(), resume="true"), tmp_path / "split")
    assert len(set(first + trained)) == len(first) + len(trained) == len(whole)  # none twice, none lost
    assert sorted(first + trained) == sorted(whole)
    assert [r["step"] for r in metrics(tmp_path / "split")] == list(range(5))


def test_requests_to_an_engine_that_went_away_go_to_another_and_it_is_left_out_of_the_push(tokenizer):
    """Two engines; one stops. The requests it would have had go to the other (counted),
    the next push forms a weight group without it, and what follows carries the new
    version; with no engine left, a request fails with a message naming the engine."""
    from grpo_lab.endpoint.app import ServeSettings
    from grpo_lab.endpoint.server import Endpoint
    from grpo_lab.modeling import build_tiny_model
    from grpo_lab.rollout import SamplingParams
    from grpo_lab.rollout.backends.hf import HFBackend
    from grpo_lab.rollout.backends.remote import RemoteBackend

    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1,
                             intermediate_size=128, seed=0)
    engines = [Endpoint.start(HFBackend(model, tokenizer), tokenizer, ServeSettings(model="policy", max_tokens=8),
                              api_key=KEY) for _ in range(2)]
    remote = RemoteBackend([e.base_url for e in engines], KEY, "policy", timeout_s=60)
    try:
        prompts = [tokenizer(f"task {i}: reach G")["input_ids"] for i in range(6)]
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=1)
        assert all(c.version == 0 for c in remote.generate(prompts, params))
        engines[0].stop()
        out = remote.generate(prompts, params)
        assert len(out) == 6 and remote.engine_stats["engine_requests_resubmitted"] >= 1
        assert remote.router.down == {engines[0].base_url}
        remote.load_weights(model.state_dict().items(), version=3)
        assert remote._members == [engines[1].base_url]
        assert all(c.version == 3 for c in remote.generate(prompts, params))
        engines[1].stop()
        with pytest.raises(EngineError, match="127.0.0.1"):
            remote.generate(prompts[:1], params)
    finally:
        remote.close()
        for e in engines:
            e.stop()


@pytest.mark.parametrize("partial", ["continue", "restart"])
def test_a_push_cuts_a_generation_short_and_it_goes_on_on_the_new_weights(tokenizer, partial):
    """A push with ``interrupt`` while a 40-token answer is being generated: with
    ``continue`` the answer keeps its first tokens, whose log-probs are the old weights',
    and the rest are the new weights' (the engine's log-probs against both models' own
    forward on the answer), its version the oldest; with ``restart`` every token is the
    new weights' and the version the new one."""
    from grpo_lab.endpoint.app import ServeSettings
    from grpo_lab.endpoint.server import Endpoint
    from grpo_lab.modeling import build_tiny_model
    from grpo_lab.rollout import SamplingParams
    from grpo_lab.rollout.backend import sampling_logprobs
    from grpo_lab.rollout.backends.hf import HFBackend
    from grpo_lab.rollout.backends.remote import RemoteBackend

    def tiny(seed):
        return build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1,
                                intermediate_size=128, seed=seed)

    old, new = tiny(0), tiny(1)
    backend = HFBackend(old, tokenizer)
    backend.eos_ids = set()  # an answer of the full length, however the random model samples
    backend.model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))  # a slow engine: ~0.4 s an answer
    engine = Endpoint.start(backend, tokenizer, ServeSettings(model="policy", max_tokens=64), api_key=KEY)
    remote = RemoteBackend([engine.base_url], KEY, "policy", timeout_s=60, interrupt=True,
                           keep_partial=partial == "continue")
    try:
        prompt = tokenizer("Frozen lake: reach G")["input_ids"]
        remote.load_weights(old.state_dict().items(), version=0)
        answer: list = []
        worker = threading.Thread(target=lambda: answer.append(
            remote.complete(prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=5))))
        worker.start()
        time.sleep(0.15)
        remote.load_weights(new.state_dict().items(), version=1)
        worker.join(30)
        (comp,) = answer
        assert len(comp.token_ids) == 40 and comp.finish_reason == "length"
        assert remote.engine_stats["engine_requests_interrupted"] == 1
        ids = torch.tensor([prompt + comp.token_ids])
        engine_lp = torch.tensor(comp.logprobs)
        with torch.no_grad():
            lp = {name: sampling_logprobs(m(ids).logits[0, len(prompt) - 1:-1], ids[0, len(prompt):], 1.0, 1.0)
                  for name, m in (("old", old), ("new", new))}
        by_old = (engine_lp - lp["old"]).abs() < 1e-4
        by_new = (engine_lp - lp["new"]).abs() < 1e-4
        if partial == "continue":
            cut = int(by_old.long().argmin())  # the first token the old weights did not sample
            assert 0 < cut < 40 and bool(by_old[:cut].all()) and bool(by_new[cut:].all())
            assert comp.version == 0
        else:
            assert bool(by_new.all()) and comp.version == 1
    finally:
        remote.close()
        engine.stop()


def test_a_run_whose_engine_goes_away_stops_at_its_last_checkpoint_naming_the_engine(tmp_path, monkeypatch):
    """The engine stops during step 1's update: the push after it (and the rollout made
    ahead) cannot reach it, and the run stops cleanly, without waiting for ever, with a
    message naming the engine, its checkpoint of step 0 intact and the command to
    resume."""
    from grpo_lab.training.stop import RunStopped

    port = free_port()
    config = run_config(port, total_steps=4, async_rollout=True, checkpoint_every=1)
    config.rollout.engine_timeout_s = 20
    trainer = Trainer(config, output_dir=tmp_path / "run")
    engine = Engine(trainer, port)
    original = PolicyUpdate.__call__

    updates = []

    def update_then_lose_the_engine(self, batch, advantages, extras=None):
        out = original(self, batch, advantages, extras)
        updates.append(1)
        if len(updates) == 2:
            engine.stop()
        return out

    monkeypatch.setattr(PolicyUpdate, "__call__", update_then_lose_the_engine)
    try:
        with pytest.raises(RunStopped) as err:
            trainer.train()
    finally:
        engine.stop()
    assert f"127.0.0.1:{port}" in str(err.value) and "trainer.resume=true" in str(err.value)
    assert err.value.last_step == 0 and (tmp_path / "run" / "checkpoints" / "step_000000").is_dir()


def test_a_lora_run_pushes_its_adapter_alone_and_the_engine_serves_the_policy(tmp_path, monkeypatch):
    """``model.lora_r=4`` with an engine serving the base model: each push carries the
    adapter's tensors only, the engine wraps its model in the adapter's config at the
    first, and its log-probs of what it samples are the trainer's policy's (an entropy
    term runs every row through the trainer's forward)."""
    from grpo_lab.rollout.backends import remote

    pushed = []
    original = remote.send_tensors

    def counting(group, named_tensors):
        named = list(named_tensors)
        pushed.append([name for name, _ in named])
        return original(group, named)

    monkeypatch.setattr(remote, "send_tensors", counting)
    config = run_config(free_port(), total_steps=3, async_rollout=True)
    config.model.lora_r = 4
    config.rollout.max_staleness = 0
    config.algo.entropy_coef = 1e-3
    trainer, _ = train_with_engine(config, tmp_path / "run")
    assert pushed and all(names and all("lora_" in n for n in names) for names in pushed)
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["logprob_diff_rollout"] < 1e-5 for r in records if "logprob_diff_rollout" in r)
    assert any("logprob_diff_rollout" in r for r in records)
