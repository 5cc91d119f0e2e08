"""The vLLM backend with a real engine (``vllm-cpu`` on CPU machines): generation, log-probs
that match the trainer's forward, in-process weight updates, and the install hint."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # a small CPU engine that stays in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
vllm = pytest.importorskip("vllm")

from grpo_lab.modeling import build_tiny_model  # noqa: E402
from grpo_lab.rollout import SamplingParams  # noqa: E402
from grpo_lab.rollout.backends.vllm import VLLMBackend  # noqa: E402
from grpo_lab.training.forward import response_logprobs  # noqa: E402

pytestmark = pytest.mark.slow

# vLLM's log-probs and the trainer's forward run different kernels; in float32 on CPU
# they agree to about 1e-6
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    model = build_tiny_model(tokenizer, hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=0)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    backend = VLLMBackend(str(path), dtype="float32", seed=0, max_model_len=512, enforce_eager=True, max_lora_rank=8)
    return backend, model


def prompts_of(tokenizer):
    return [tokenizer(t)["input_ids"] for t in ("Frozen lake: reach G", "Now:\n. P . .\nYour answer:", "row 2")]


def test_generation_logprobs_match_the_training_forward(engine, tokenizer):
    backend, model = engine
    prompts = prompts_of(tokenizer)
    for temperature in (1.0, 0.7):
        comps = backend.generate(prompts, SamplingParams(max_tokens=10, temperature=temperature))
        assert len(comps) == 3
        for c in comps:
            assert 0 < len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in ("stop", "length")
        logp, mask, _ = response_logprobs(model, [torch.tensor(p) for p in prompts],
                                          [torch.tensor(c.token_ids) for c in comps], temperature=temperature)
        for i, c in enumerate(comps):
            assert (logp[i, : len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max() < LOGPROB_TOL


def test_logprobs_with_top_p_are_those_the_hf_backend_reports(engine, tokenizer):
    """vLLM and the HF backend report the same quantity with top_p < 1: the log-prob under
    the distribution sampled from (temperature, then the top-p set renormalised)."""
    from test_hf_backend import assert_same_quantity, sampler_reference

    backend, model = engine
    prompts = prompts_of(tokenizer)
    comps = backend.generate(prompts, SamplingParams(max_tokens=12, temperature=0.8, top_p=0.7))
    assert_same_quantity(sampler_reference(model, prompts, comps, 0.8, 0.7), comps)


def test_stop_string_ends_the_text_and_the_tokens(engine, tokenizer):
    """Generation stops at the token that completes the stop string: the text ends with
    the stop string (which is kept), and the token ids end with that token (which may
    carry more characters after it)."""
    backend, _ = engine
    comps = backend.generate(prompts_of(tokenizer), SamplingParams(max_tokens=30, stop=(" ",)))
    stopped = [c for c in comps if c.finish_reason == "stop" and c.token_ids[-1] != tokenizer.eos_token_id]
    assert stopped, "no completion met the stop string"
    for c in stopped:
        decoded = tokenizer.decode(c.token_ids)
        assert c.text.endswith(" ") and c.text.count(" ") == 1
        assert decoded.startswith(c.text) and " " not in tokenizer.decode(c.token_ids[:-1])


def test_weight_update_changes_the_next_generation(engine, tokenizer):
    backend, model = engine
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    before = backend.generate(prompts_of(tokenizer), greedy)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    backend.load_weights(model.state_dict().items())  # tied lm_head alias included
    after = backend.generate(prompts_of(tokenizer), greedy)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    # the engine now computes with the new weights: its log-probs match the updated model
    sampled = backend.generate(prompts_of(tokenizer), SamplingParams(max_tokens=8))
    logp, _, _ = response_logprobs(model, [torch.tensor(p) for p in prompts_of(tokenizer)],
                                   [torch.tensor(c.token_ids) for c in sampled])
    for i, c in enumerate(sampled):
        assert (logp[i, : len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max() < LOGPROB_TOL
    backend.load_weights(original.items())
    restored = backend.generate(prompts_of(tokenizer), greedy)
    assert [c.token_ids for c in restored] == [c.token_ids for c in before]
    model.load_state_dict(original)


def test_missing_vllm_names_the_install_command(monkeypatch):
    import builtins

    from grpo_lab.rollout.backends import vllm as module

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm":
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        module.import_vllm()


def test_seeded_chunked_prefill_failure_names_the_fix():
    from grpo_lab.rollout.backends.vllm import _explain

    err = _explain(RuntimeError("CPU Generator does not use offset"))
    assert "max_num_batched_tokens" in str(err) and "rollout.request_seeds=false" in str(err)
    other = RuntimeError("something else")
    assert _explain(other) is other


def test_many_long_prompts_are_prefilled_in_chunks(engine, tokenizer):
    """More prompt tokens than one engine step takes (chunked prefill) still sample."""
    backend, _ = engine
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, len(tokenizer) - 2, (300,), generator=gen).tolist() for _ in range(24)]
    comps = backend.generate(prompts, SamplingParams(max_tokens=4, temperature=1.0))
    assert len(comps) == 24 and all(len(c.token_ids) >= 1 for c in comps)


def test_stream_returns_each_request_once_and_admits_requests_mid_flight(engine, tokenizer):
    """The engine's continuous batching through ``VLLMStream``: a request submitted after
    decoding started joins the running batch, every key comes back exactly once, and the
    log-probs match the trainer's forward."""
    backend, model = engine
    stream = backend.stream()
    prompts = prompts_of(tokenizer)
    params = SamplingParams(max_tokens=12, temperature=1.0)
    stream.submit("a", prompts[0], params)
    stream.submit("b", prompts[1], params)
    done = dict(stream.step())
    stream.submit("c", prompts[2], params)  # joins while a and b decode
    while stream.num_unfinished():
        for key, comp in stream.step():
            assert key not in done
            done[key] = comp
    assert sorted(done) == ["a", "b", "c"]
    assert stream.stats.peak_inflight_requests == 3
    assert stream.stats.generated_tokens == sum(len(c.token_ids) for c in done.values())
    comps = [done[k] for k in "abc"]
    logp, _, _ = response_logprobs(model, [torch.tensor(p) for p in prompts], [torch.tensor(c.token_ids) for c in comps])
    for i, c in enumerate(comps):
        assert (logp[i, : len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max() < LOGPROB_TOL


def test_scheduled_episodes_on_the_engine_equal_the_lock_step_loop(engine, tokenizer):
    """Property: with per-request seeds, continuous refill on vLLM's own batching returns
    exactly the episodes of the lock-step loop on ``LLM.generate``."""
    from grpo_lab.envs import FrozenLakeEnv
    from grpo_lab.rollout import AgentLoopConfig, PromptEncoder, SchedulerConfig, run_episodes, run_scheduled

    backend, _ = engine
    encoder = PromptEncoder(tokenizer)
    config = AgentLoopConfig(group_size=3, max_steps=4, history_window=1,
                             sampling=SamplingParams(max_tokens=8, stop=("</action>",)), request_seed=3)
    plain = run_episodes(backend, encoder, FrozenLakeEnv, [1, 2], config)
    batch, stats = run_scheduled(backend.stream(), encoder, FrozenLakeEnv, [1, 2], config,
                                 SchedulerConfig(mode="continuous", max_inflight=2, env_workers=2))
    assert len(batch) == len(plain) and stats.stream.peak_inflight_requests <= 2
    assert torch.equal(batch.traj_id, plain.traj_id) and torch.equal(batch.reward, plain.reward)
    for x, y in zip(batch.response_ids, plain.response_ids):
        assert torch.equal(x, y)
    for x, y in zip(batch.rollout_logprobs, plain.rollout_logprobs):
        assert torch.allclose(x, y, atol=1e-6)


def test_conversation_episodes_on_the_engine_are_token_in_token_out(engine, tokenizer):
    """Conversation episodes on vLLM: each turn's prompt and answer start the next prompt,
    and the trie forward of the training step gives the engine's log-probs back."""
    import copy

    from grpo_lab.envs import FrozenLakeEnv
    from grpo_lab.rollout import AgentLoopConfig, PromptEncoder, run_episodes
    from grpo_lab.rollout.conversation import is_prefix
    from grpo_lab.training.shared_prefix import enable_shared_prefix
    from grpo_lab.training.trie import trie_logprobs

    backend, model = engine
    config = AgentLoopConfig(group_size=2, max_steps=4, sampling=SamplingParams(max_tokens=8, stop=("</action>",)),
                             request_seed=5, episode_format="conversation", max_episode_tokens=400)
    batch = run_episodes(backend, PromptEncoder(tokenizer), FrozenLakeEnv, [1, 2], config)
    assert int(batch.step.max()) >= 1
    for i in range(len(batch) - 1):
        if batch.traj_id[i] == batch.traj_id[i + 1]:
            turn = batch.prompt_ids[i].tolist() + batch.response_ids[i].tolist()
            assert is_prefix(turn, batch.prompt_ids[i + 1].tolist())
    packed = enable_shared_prefix(copy.deepcopy(model))
    with torch.no_grad():
        logp, _, _ = trie_logprobs(packed, batch.prompt_ids, batch.response_ids)
    for i, expected in enumerate(batch.rollout_logprobs):
        assert (logp[i, : expected.numel()] - expected).abs().max() < LOGPROB_TOL


def test_lora_adapter_push_serves_the_trained_policy(engine, tokenizer):
    """Only the adapter travels (PEFT format, memory-backed directory); after each push
    the engine's log-probs match the adapted model, and a second push replaces the
    first (no stale adapter is served); unloading serves the base model again."""
    import copy

    peft = pytest.importorskip("peft")  # noqa: F841
    from grpo_lab.training.lora import adapter_state, apply_lora

    backend, model = engine
    prompts = prompts_of(tokenizer)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    base = backend.generate(prompts, greedy)
    adapted = apply_lora(copy.deepcopy(model), r=8, alpha=16, dropout=0.0, target_modules="all-linear").eval()
    for flip in (1.0, -1.0):
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.5 * flip)
        backend.load_adapter(*adapter_state(adapted))
        comps = backend.generate(prompts, SamplingParams(max_tokens=8))
        with torch.no_grad():
            logp, _, _ = response_logprobs(adapted, [torch.tensor(p) for p in prompts],
                                           [torch.tensor(c.token_ids) for c in comps])
        for i, c in enumerate(comps):
            assert (logp[i, : len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max() < LOGPROB_TOL
    backend.unload_adapter()
    assert [c.token_ids for c in backend.generate(prompts, greedy)] == [c.token_ids for c in base]


# before the runs below, which start engines of their own in this process (vLLM's parallel state is global)
def test_the_endpoint_on_vllm_joins_concurrent_calls_into_the_running_batch(engine, tokenizer):
    """Concurrent agents' calls through the endpoint on the vLLM engine: several are in
    flight in the engine at once, and every episode's rows are its responses' ids."""
    import copy

    from grpo_lab.endpoint.app import ServeSettings
    from grpo_lab.endpoint.server import Endpoint
    from chat_templates import CHATML
    from test_serve import concurrent_two_call_episodes

    backend, _ = engine
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    endpoint = Endpoint.start(backend, tok, ServeSettings(model="policy", max_tokens=6, max_context=512))
    try:
        concurrent_two_call_episodes(endpoint, 16)
    finally:
        endpoint.stop()
    assert endpoint.queue.stats.peak_inflight > 1


def test_training_run_on_the_vllm_backend(tmp_path):
    """(Last in this file: vLLM keeps process-wide parallel state, and a second engine in
    the same process must come after the module's engine is done.)

    rollout.backend=vllm end to end: weights pushed after each update, and the engine's
    log-probs agree with the trainer's forward on what it sampled."""
    import json

    from grpo_lab.config import AlgoConfig, Config, EnvConfig, LoggerConfig, ModelConfig, RolloutConfig, TrainerConfig, WarmupConfig
    from grpo_lab.trainer import Trainer

    config = Config(
        algo=AlgoConfig(group_size=4, kl_coef=0.01),  # the KL term makes every step update
        env=EnvConfig(max_steps=4),
        model=ModelConfig(tiny_hidden_size=128, tiny_num_heads=2, tiny_num_kv_heads=1, tiny_intermediate_size=128),
        rollout=RolloutConfig(backend="vllm", vllm_max_model_len=1024),
        trainer=TrainerConfig(total_steps=2, tasks_per_step=4, eval_episodes=4, lr=1e-3,
                              warmup=WarmupConfig(steps=40, batch_size=16, episodes=60)),
        logger=LoggerConfig(wandb="false", progress_bar=False, plot=False),
    )
    trainer = Trainer(config, output_dir=tmp_path)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    updated = [r for r in records if r["num_updates"]]
    assert updated, f"no update happened: {records}"
    assert all(r["logprob_diff_rollout"] < LOGPROB_TOL for r in updated)


def test_command_line_run_keeps_engine_chatter_in_the_log_file(tmp_path):
    """``python -m grpo_lab.train rollout=vllm``: vLLM's INFO lines and its harmless rotary
    reload warning stay off the console, and are all in the run's log file."""
    import subprocess
    import sys

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_lab.train", "rollout=vllm", "trainer.total_steps=1", "trainer.tasks_per_step=2",
         "trainer.eval_episodes=2", "trainer.warmup.steps=2", "trainer.warmup.episodes=8", "logger.wandb=false",
         "logger.progress_bar=false", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "Failed to load weights" not in console
    vllm_info = [line for line in console.splitlines() if "][vllm" in line and "][INFO]" in line or ") INFO " in line]
    assert not vllm_info, vllm_info[:3]
    log = (tmp_path / "train.log").read_text()
    assert "][vllm" in log and "][INFO]" in log
    assert "Reloading weights inplace" in log and "RotaryEmbedding: Failed to load weights" in log
    assert "success rate" in console
