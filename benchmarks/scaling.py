"""Data-parallel throughput, and (on a GPU) the cost of bf16 and gradient checkpointing.

    python benchmarks/scaling.py                 # CPU: 1 process vs 2 under torchrun
    python benchmarks/scaling.py --gpu           # also: one GPU, a Qwen2.5-1.5B-sized model

**CPU.** The same run (the tiny model on FrozenLake, ``--tasks`` tasks of 4 episodes per
step, no warm-up, no evaluation) in 1 process with all the machine's threads and in 2
processes under ``torchrun`` (gloo) with half the threads each; rank 0 reports the
seconds of each step after the first and the response tokens trained on. The table gives
episodes and tokens per second and the 2-process / 1-process ratio, measured side by
side in one invocation.

**GPU.** A random-weight model with Qwen2.5-1.5B's configuration (no download), float32
weights and AdamW, one optimizer step on ``--rows`` rows of ``--tokens`` tokens: training
tokens per second and peak memory, with ``trainer.mixed_precision`` no/bf16 and
gradient checkpointing off/on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_run(processes: int, threads: int, tasks: int, steps: int, out: Path) -> dict:
    overrides = ["trainer.device=cpu", f"trainer.total_steps={steps}", f"trainer.tasks_per_step={tasks}",
                 "trainer.warmup.steps=0", "trainer.eval_episodes=0", "rollout.env_workers=0", "trainer.save_final=false",
                 "logger.wandb=false", "logger.progress_bar=false", "logger.plot=false", f"trainer.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    if processes == 1:
        cmd = [sys.executable, "-m", "grpo_lab.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "grpo_lab.train", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # first: start-up
    seconds = sum(r["rollout_time"] + r["update_time"] for r in records)
    episodes = len(records) * tasks * 4
    return {"processes": processes, "threads": threads, "s_per_step": seconds / len(records),
            "episodes_per_s": episodes / seconds, "tokens_per_s": sum(r["response_tokens"] for r in records) / seconds,
            "wall": wall}


def gpu_table(rows: int, tokens: int) -> list[dict]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_lab.config import AlgoConfig
    from grpo_lab.data import RolloutBatch
    from grpo_lab.training.distributed import autocast
    from grpo_lab.training.step import policy_gradient_backward
    from grpo_lab.training.update import enable_gradient_checkpointing

    config = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    prompt, response = tokens // 4, tokens - tokens // 4
    batch = RolloutBatch(
        group_id=[i // 4 for i in range(rows)], traj_id=list(range(rows)), step=[0] * rows,
        prompt_ids=[torch.randint(0, 150000, (prompt,), generator=gen) for _ in range(rows)],
        response_ids=[torch.randint(0, 150000, (response,), generator=gen) for _ in range(rows)],
        rollout_logprobs=[torch.full((response,), -5.0) for _ in range(rows)],
        loss_mask=[torch.ones(response) for _ in range(rows)], reward=[float(i % 2) for i in range(rows)],
        done=[True] * rows, valid_action=[True] * rows, anchor=[None] * rows)
    adv = torch.tensor([1.0 if i % 2 else -1.0 for i in range(rows)])
    out = []
    for precision in ("no", "bf16"):
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(config).to(device)
            model.config._attn_implementation = "sdpa"
            if checkpointing:
                enable_gradient_checkpointing(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
            model.train()
            times = []
            torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                policy_gradient_backward(model, batch, torch.arange(rows), adv, None, AlgoConfig().objective(), micro_batch_size=rows,
                                         max_tokens=response, autocast=lambda: autocast(device, precision))
                optimizer.step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            best = min(times[1:])
            out.append({"mixed_precision": precision, "gradient_checkpointing": checkpointing,
                        "tokens_per_s": rows * tokens / best, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
            del model, optimizer
            torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    if not args.gpu:
        with tempfile.TemporaryDirectory() as tmp:
            one = cpu_run(1, args.threads, args.tasks, args.steps, Path(tmp) / "one")
            two = cpu_run(2, max(1, args.threads // 2), args.tasks, args.steps, Path(tmp) / "two")
        print("| processes | threads each | s/step | episodes/s | response tokens/s |")
        print("| --- | --- | --- | --- | --- |")
        for r in (one, two):
            print(f"| {r['processes']} | {r['threads']} | {r['s_per_step']:.2f} | {r['episodes_per_s']:.1f} | "
                  f"{r['tokens_per_s']:.0f} |")
        print(f"\n2 processes / 1 process, episodes per second: {two['episodes_per_s'] / one['episodes_per_s']:.2f}x")
        return
    import torch

    print(f"device: {torch.cuda.get_device_name()}")
    print("| mixed_precision | gradient_checkpointing | training tokens/s | peak memory (GiB) |")
    print("| --- | --- | --- | --- |")
    table = gpu_table(args.rows, args.tokens)
    for r in table:
        print(f"| {r['mixed_precision']} | {r['gradient_checkpointing']} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} |")
    base = table[0]
    for r in table[1:]:
        print(f"{r['mixed_precision']}, checkpointing={r['gradient_checkpointing']}: "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, {r['peak_gib'] / base['peak_gib']:.2f}x memory")


if __name__ == "__main__":
    main()
