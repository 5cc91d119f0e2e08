"""Engines in their own processes: ``python -m grpo_lab.serve`` started as a user would,
generation through :class:`~grpo_lab.rollout.backends.remote.RemoteBackend` over HTTP,
and weights pushed over a gloo group of the trainer and the engine."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch

from grpo_lab.modeling import build_tiny_model
from grpo_lab.rollout import SamplingParams
from grpo_lab.rollout.backends.hf import HFBackend
from grpo_lab.rollout.backends.remote import RemoteBackend
from grpo_lab.rollout.backends.weight_stream import receive_tensors, send_tensors, weight_group

KEY = "sk-engine-test-key"


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    """A tiny model saved to disk and an engine process serving it; the trainer's copy."""
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1,
                             intermediate_size=128, seed=0)
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    proc = subprocess.Popen([sys.executable, "-m", "grpo_lab.serve", f"model.name_or_path={path}", "serve.port=0",
                             f"serve.api_key={KEY}", "serve.model_name=policy", "rollout.max_new_tokens=8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = proc.stdout.readline()
    if not banner.startswith("serving"):
        proc.kill()
        pytest.fail(f"the engine did not start: {banner}{proc.stderr.read()[-2000:]}")
    url = banner.split(" at ")[1].strip()
    yield url, model, path
    proc.terminate()
    proc.wait(timeout=60)


def prompts_of(tokenizer):
    return [tokenizer(t)["input_ids"] for t in ("Frozen lake: reach G", "Now:\n. P . .\nYour answer:", "row 2")]


def test_a_tensor_stream_crosses_a_gloo_group_with_names_dtypes_and_shapes():
    import threading

    from grpo_lab.rollout.backends.weight_stream import free_port

    tensors = [("a.weight", torch.randn(3, 4)), ("b", torch.arange(5)), ("c.bf16", torch.randn(2, 2).bfloat16()),
               ("scalar", torch.tensor(2.5, dtype=torch.float16))]
    port, got = free_port(), []

    def receiver():
        group = weight_group("127.0.0.1", port, 1, 2, 30)
        got.extend(receive_tensors(group))

    thread = threading.Thread(target=receiver)
    thread.start()
    assert send_tensors(weight_group("127.0.0.1", port, 0, 2, 30), tensors) == 4
    thread.join()
    assert [n for n, _ in got] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(tensors, got):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_the_engine_generates_what_the_same_weights_generate_here(engine, tokenizer):
    """Greedy answers and their log-probs from the engine process equal the in-process
    backend's on the same weights."""
    url, model, _ = engine
    remote = RemoteBackend([url], KEY, "policy")
    params = SamplingParams(max_tokens=8, temperature=0.0)
    local = HFBackend(model, tokenizer).generate(prompts_of(tokenizer), params)
    far = remote.generate(prompts_of(tokenizer), params)
    for a, b in zip(local, far):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    remote.close()


def test_pushed_weights_are_the_trainers_and_carry_a_version(engine, tokenizer):
    """After the trainer changes its weights and pushes them, the engine's greedy answers
    and log-probs are those of the new weights, and it serves version 1, then 2."""
    url, model, _ = engine
    remote = RemoteBackend([url], KEY, "policy")
    changed = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1,
                               intermediate_size=128, seed=1)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    before = remote.generate(prompts_of(tokenizer), params)
    remote.load_weights(changed.state_dict().items())
    assert remote.version == 1
    after = remote.generate(prompts_of(tokenizer), params)
    expected = HFBackend(changed, tokenizer).generate(prompts_of(tokenizer), params)
    assert [c.token_ids for c in after] == [c.token_ids for c in expected]
    for a, b, old in zip(after, expected, before):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        assert not torch.allclose(torch.tensor(a.logprobs), torch.tensor(old.logprobs), atol=1e-3)  # it changed
    answer = httpx.post(f"{url}/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "policy", "prompt": prompts_of(tokenizer)[0], "max_tokens": 2}).json()
    assert answer["weight_version"] == 1
    remote.load_weights(model.state_dict().items())  # back to the fixture's weights, version 2
    assert httpx.get(f"{url}/weights", headers={"Authorization": f"Bearer {KEY}"}).json() == {"version": 2}
    for a, b in zip(remote.generate(prompts_of(tokenizer), params), before):
        assert a.token_ids == b.token_ids and torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    remote.close()


def engine_run_metrics(out) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# per-request seeds: an engine's samples do not depend on the order its concurrent requests arrive in
COMMON = ["trainer.total_steps=3", "trainer.tasks_per_step=4", "algo.group_size=4", "trainer.eval_episodes=4",
          "trainer.warmup.steps=30", "rollout.request_seeds=true", "logger.progress_bar=false", "logger.wandb=false",
          "trainer.save_final=false"]


@pytest.mark.slow
def test_a_run_with_an_engine_process_trains_on_what_it_generates_with_the_pushed_weights(tmp_path):
    """``rollout.engines=1``: the run starts its engine, generates there, pushes the
    weights after every update, and stops the engine at its end. The engine's log-probs
    of the sampled tokens equal the trainer's forward on them at every step (a stale or
    wrong push would show here), and a step's update changed the weights."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "grpo_lab.train", "rollout.engines=1", f"trainer.output_dir={out}",
                           *COMMON], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = engine_run_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2] and all(r["num_updates"] == 1 for r in records)
    assert max(r["logprob_diff_rollout"] for r in records) < 1e-5
    assert "serving 'policy'" not in (out / "engine_0.log").read_text()  # its banner went to the trainer
    survivors = subprocess.run(["pgrep", "-f", f"model.name_or_path={out / 'initial_model'}"], capture_output=True,
                               text=True)
    assert survivors.returncode == 1 and survivors.stdout == ""  # 1: no process matched


@pytest.mark.slow
def test_the_one_command_async_run_trains_within_its_staleness_bound(tmp_path):
    """``trainer.async=true rollout.engines=1``, as a user types it: the run starts its
    engine, trains while it generates, no row more than one version old, and leaves no
    engine behind."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "grpo_lab.train", "trainer.async=true", "rollout.engines=1",
                           f"trainer.output_dir={out}", *COMMON], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = engine_run_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["staleness_max"] <= 1 and "rollout_wait_time" in r for r in records)
    assert all(r["engine_requests_resubmitted"] == 0 and r["engine_restarts"] == 0 for r in records)
    survivors = subprocess.run(["pgrep", "-f", f"model.name_or_path={out / 'initial_model'}"], capture_output=True,
                               text=True)
    assert survivors.returncode == 1


@pytest.mark.slow
def test_two_trainer_processes_share_one_engine_that_rank_0_starts_and_pushes_to(tmp_path):
    """``torchrun --nproc_per_node 2 ... trainer.async=true rollout.engines=1
    rollout.max_staleness=0``: rank 0 starts the one engine and pushes the weights; both
    ranks generate on it, and every step's samples are the pushed weights' (the
    engine's log-probs equal the trainer's forward on both ranks)."""
    import os

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "grpo_lab.train", "trainer.device=cpu", "rollout.env_workers=0", "trainer.async=true",
                           "rollout.engines=1", "rollout.max_staleness=0", f"trainer.output_dir={out}", *COMMON],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    records = engine_run_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2] and all(r["world_size"] == 2 for r in records)
    assert all(r["staleness_max"] == 0 for r in records)
    assert all(r["logprob_diff_rollout"] < 1e-5 for r in records if "logprob_diff_rollout" in r)
    assert any("logprob_diff_rollout" in r for r in records)
    assert sorted(p.name for p in out.glob("engine_*.log")) == ["engine_0.log"]
    survivors = subprocess.run(["pgrep", "-f", f"model.name_or_path={out / 'initial_model'}"], capture_output=True,
                               text=True)
    assert survivors.returncode == 1


@pytest.mark.slow
def test_an_engine_process_that_dies_is_started_again_and_gets_the_weights(tokenizer, tmp_path):
    """An engine this run started is killed: the next push starts it again (logged in
    the same file), gives it the weights of that version, and it serves them."""
    from grpo_lab.rollout.backends.engine_processes import EngineProcesses

    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1,
                             intermediate_size=128, seed=0)
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    command = [sys.executable, "-m", "grpo_lab.serve", f"model.name_or_path={tmp_path / 'policy'}", "serve.port=0",
               f"serve.api_key={KEY}", "serve.model_name=policy", "rollout.max_new_tokens=8"]
    engines = EngineProcesses.start([command], [tmp_path / "engine_0.log"], timeout_s=300)
    remote = RemoteBackend(engines.urls, KEY, "policy", timeout_s=120)
    remote.processes = engines
    try:
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=2)
        remote.load_weights(model.state_dict().items(), version=1)
        assert remote.generate(prompts_of(tokenizer), params)[0].version == 1
        engines.procs[0].kill()
        engines.procs[0].wait(30)
        remote.load_weights(model.state_dict().items(), version=2)
        assert remote.engine_stats["engine_restarts"] == 1 and engines.procs[0].poll() is None
        assert [c.version for c in remote.generate(prompts_of(tokenizer), params)] == [2, 2, 2]
    finally:
        remote.close()


@pytest.mark.slow
def test_a_run_trains_on_an_engine_started_elsewhere(engine, tmp_path):
    """``rollout.engine_urls``: the engine of another ``python -m grpo_lab.serve`` (here the
    fixture's), on the same model directory; its weights follow the trainer's."""
    url, _, path = engine
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "grpo_lab.train", f"rollout.engine_urls=[{url}]",
                           f"rollout.engine_api_key={KEY}", f"model.name_or_path={path}", "serve.model_name=policy",
                           f"trainer.output_dir={out}", *COMMON], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = engine_run_metrics(out)
    assert len(records) == 3 and all(r["logprob_diff_rollout"] < 1e-5 for r in records if "logprob_diff_rollout" in r)
    version = httpx.get(f"{url}/weights", headers={"Authorization": f"Bearer {KEY}"}).json()["version"]
    assert version == 3  # the policy version of the run's last step (the warm-up's weights are version 0)
