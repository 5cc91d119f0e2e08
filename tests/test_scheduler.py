"""The episode schedulers (micro groups, continuous refill, length-aware order, async
environment steps) return exactly the episodes of the plain lock-step loop, and respect
their slot budget and round structure."""

from __future__ import annotations

import threading
import time
import zlib

import pytest
import torch

from grpo_lab.envs import FrozenLakeEnv
from grpo_lab.envs.base import Observation, StepResult
from grpo_lab.rollout import (
    AgentLoopConfig,
    BatchStream,
    Completion,
    HFBackend,
    LengthPredictor,
    PromptEncoder,
    SamplingParams,
    SchedulerConfig,
    StreamStats,
    run_episodes,
    run_scheduled,
)
from grpo_lab.rollout.backend import per_request


class CorridorEnv:
    """Positions 0..4; ``right`` moves on, ``wait`` stays, anything else is illegal. The
    start is ``seed % 3``, so groups differ in how long their episodes run."""

    instruction = "Reach 4."

    def __init__(self, delay: float = 0.0, tracker=None):
        self.delay, self.tracker = delay, tracker

    def reset(self, seed):
        self.pos = seed % 3
        return Observation(f"at {self.pos}", ("corridor", self.pos))

    def legal_actions(self):
        return ["right", "wait"]

    def step(self, action):
        if self.tracker is not None:
            self.tracker.enter()
        try:
            if self.delay:
                time.sleep(self.delay)
            if action not in self.legal_actions():
                return StepResult(Observation(f"at {self.pos}", ("corridor", self.pos)), 0.0, False,
                                  {"won": False, "valid_action": False})
            self.pos += action == "right"
            won = self.pos == 4
            return StepResult(Observation(f"at {self.pos}", ("corridor", self.pos)), float(won), won,
                              {"won": won, "valid_action": True})
        finally:
            if self.tracker is not None:
                self.tracker.leave()


class Concurrency:
    """Counts environment steps running at the same time."""

    def __init__(self):
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def enter(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self):
        with self.lock:
            self.now -= 1


ANSWERS = ["<action>right</action>", "<action>wait</action>", "<action>jump</action>", "hmm", "<action>right</action> ok"]


class HashBackend:
    """Deterministic: the answer is a function of (prompt, seed) only, never of the batch."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        out = []
        for p, sp in zip(prompts, per_request(params, len(prompts))):
            h = zlib.crc32(bytes(str((list(p), sp.seed)), "utf8"))
            text = ANSWERS[h % len(ANSWERS)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: sp.max_tokens]
            out.append(Completion(ids, [-((h >> 8) % 97) / 50.0] * len(ids), text=text))
        return out


class TickStream:
    """A continuous-batching engine in miniature: a request finishes after as many steps
    as it has tokens; requests submitted between steps join at the next one."""

    def __init__(self, backend):
        self.backend, self.stats, self.live, self.history = backend, StreamStats(), {}, []

    def submit(self, key, prompt, params):
        comp = self.backend.generate([prompt], [params])[0]
        self.live[key] = [comp, max(1, len(comp.token_ids)), len(prompt)]

    def num_unfinished(self):
        return len(self.live)

    def step(self):
        self.stats.engine_steps += 1
        self.stats.decode_steps += 1
        self.stats.peak_inflight_requests = max(self.stats.peak_inflight_requests, len(self.live))
        self.history.append(set(self.live))
        done = []
        for key, entry in list(self.live.items()):
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[key]
                done.append((key, entry[0]))
                self.stats.generated_tokens += len(entry[0].token_ids)
        return done


def loop_config(G=4, seed=7):
    return AgentLoopConfig(group_size=G, max_steps=6, history_window=1, sampling=SamplingParams(max_tokens=12), request_seed=seed)


def assert_same_batch(a, b):
    assert len(a) == len(b)
    for name in ("group_id", "traj_id", "step", "reward", "done", "valid_action", "won"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.anchor == b.anchor
    for name in ("prompt_ids", "response_ids", "rollout_logprobs"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.equal(x, y), name


SEEDS = [0, 1, 2, 5, 4]  # starts 0, 1, 2, 2, 1


@pytest.mark.parametrize("mode", ["micro", "continuous"])
@pytest.mark.parametrize("order", ["fifo", "shortest_first", "longest_first"])
@pytest.mark.parametrize("env_workers", [0, 3])
@pytest.mark.parametrize("engine", ["batch", "tick"])
def test_every_schedule_returns_the_plain_loops_episodes(tokenizer, mode, order, env_workers, engine):
    """Property: for a deterministic backend, the scheduled batch equals the lock-step
    batch in every column (same ids, same row order, same tokens)."""
    encoder = PromptEncoder(tokenizer)
    config = loop_config()
    plain = run_episodes(HashBackend(tokenizer), encoder, CorridorEnv, SEEDS, config, first_group_id=3)
    backend = HashBackend(tokenizer)
    stream = BatchStream(backend) if engine == "batch" else TickStream(backend)
    predictor = LengthPredictor()
    predictor.observe(("corridor", 2), 5)  # start 2 is known to be short
    sched = SchedulerConfig(mode=mode, max_inflight=6, micro_group_size=2, order=order, env_workers=env_workers)
    batch, stats = run_scheduled(stream, encoder, CorridorEnv, SEEDS, config, sched, first_group_id=3, predictor=predictor)
    assert_same_batch(batch, plain)
    assert stats.max_running_episodes <= 6 and stream.stats.peak_inflight_requests <= 6
    assert sorted(stats.admissions) == sorted(set(batch.traj_id.tolist()))
    assert stream.stats.generated_tokens == batch.num_response_tokens()


def test_micro_rounds_admit_whole_micro_groups_and_wait_for_the_round(tokenizer):
    """Property: in ``micro`` mode the requests in flight at any engine step all belong to
    one round of whole micro-groups, and a round never exceeds the slots."""
    encoder = PromptEncoder(tokenizer)
    stream = TickStream(HashBackend(tokenizer))
    sched = SchedulerConfig(mode="micro", max_inflight=5, micro_group_size=2)
    G = 4
    _, stats = run_scheduled(stream, encoder, CorridorEnv, SEEDS, loop_config(G), sched)
    # admissions come in rounds of two micro-groups (4 episodes; 5 slots fit 2 of size 2)
    rounds = [stats.admissions[k : k + 4] for k in range(0, len(stats.admissions), 4)]
    assert len(rounds) == len(SEEDS) * G // 4
    for r in rounds:
        assert len(r) == 4 and all(t // G == r[0] // G for t in r[:2]) and all(t // G == r[2] // G for t in r[2:])
    round_of = {t: k for k, r in enumerate(rounds) for t in r}
    for live in stream.history:
        assert len({round_of[t] for t in live}) == 1


def test_continuous_refill_uses_fewer_engine_steps_than_rounds(tokenizer):
    """Property: with the same slots, refilling a slot at once never idles it, so the
    engine needs fewer steps than micro rounds that wait for their slowest episode."""
    encoder = PromptEncoder(tokenizer)
    steps = {}
    for mode in ("micro", "continuous"):
        stream = TickStream(HashBackend(tokenizer))
        run_scheduled(stream, encoder, CorridorEnv, SEEDS, loop_config(), SchedulerConfig(mode=mode, max_inflight=4, micro_group_size=2))
        steps[mode] = stream.stats.engine_steps
    assert steps["continuous"] < steps["micro"]


def test_length_aware_order_admits_the_predicted_shortest_first(tokenizer):
    """Property: with ``shortest_first`` the first admitted group is the one whose start
    the predictor knows to be shortest; with ``longest_first``, the longest."""
    encoder = PromptEncoder(tokenizer)
    predictor = LengthPredictor()
    for key, tokens in ((("corridor", 0), 90), (("corridor", 1), 50), (("corridor", 2), 10)):
        predictor.observe(key, tokens)
    first = {}
    for order in ("fifo", "shortest_first", "longest_first"):
        sched = SchedulerConfig(mode="continuous", max_inflight=1, order=order)
        _, stats = run_scheduled(BatchStream(HashBackend(tokenizer)), encoder, CorridorEnv, [0, 1, 2], loop_config(G=2), sched,
                                 predictor=LengthPredictor() if order == "fifo" else predictor)
        first[order] = stats.admissions[0] // 2  # group index
    assert first == {"fifo": 0, "shortest_first": 2, "longest_first": 0}


def test_predictor_falls_back_to_the_mean_of_known_starts():
    p = LengthPredictor()
    assert p.predict("a") is None
    p.observe("a", 10)
    p.observe("a", 20)
    p.observe("b", 60)
    assert p.predict("a") == 15 and p.predict("b") == 60 and p.predict("new") == 30


def test_environment_steps_overlap_in_worker_threads(tokenizer):
    """Property: with ``env_workers > 1`` several environment steps run at the same time
    (with 0 they never do), and the episodes are unchanged."""
    encoder = PromptEncoder(tokenizer)
    config = loop_config()
    plain = run_episodes(HashBackend(tokenizer), encoder, CorridorEnv, SEEDS, config)
    for workers, overlapped in ((0, False), (4, True)):
        tracker = Concurrency()
        batch, stats = run_scheduled(BatchStream(HashBackend(tokenizer)), encoder, lambda: CorridorEnv(0.01, tracker), SEEDS,
                                     config, SchedulerConfig(mode="continuous", env_workers=workers))
        assert_same_batch(batch, plain)
        assert (tracker.most > 1) == overlapped
        assert stats.env_seconds > 0


def test_scheduler_config_names_bad_values():
    with pytest.raises(ValueError, match="'greedy'"):
        SchedulerConfig(mode="greedy")
    with pytest.raises(ValueError, match="'random'"):
        SchedulerConfig(order="random")
    with pytest.raises(ValueError, match="max_inflight"):
        SchedulerConfig(max_inflight=0)


def test_a_micro_group_larger_than_the_slots_is_refused(tokenizer):
    with pytest.raises(ValueError, match="micro_group_size 4"):
        run_scheduled(BatchStream(HashBackend(tokenizer)), PromptEncoder(tokenizer), CorridorEnv, [0], loop_config(),
                      SchedulerConfig(mode="micro", max_inflight=2, micro_group_size=4))


def test_hf_backend_with_request_seeds_gives_the_same_episodes_under_any_schedule(tiny_model, tokenizer):
    """Property: per-request seeds make the real HF sampler independent of batching: the
    continuous scheduler (small batches) reproduces the lock-step loop (one big batch)."""
    encoder = PromptEncoder(tokenizer)
    config = AgentLoopConfig(group_size=3, max_steps=3, history_window=1,
                             sampling=SamplingParams(max_tokens=8, temperature=1.0), request_seed=11)
    env = lambda: FrozenLakeEnv()  # noqa: E731
    plain = run_episodes(HFBackend(tiny_model, tokenizer), encoder, env, [1, 2], config)
    batch, _ = run_scheduled(HFBackend(tiny_model, tokenizer, max_batch_size=2).stream(), encoder, env, [1, 2], config,
                             SchedulerConfig(mode="continuous", max_inflight=2))
    assert len(batch) == len(plain)
    for x, y in zip(batch.response_ids, plain.response_ids):
        assert torch.equal(x, y)
    for x, y in zip(batch.rollout_logprobs, plain.rollout_logprobs):
        assert torch.allclose(x, y, atol=1e-5)
