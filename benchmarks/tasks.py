"""Every shipped task with the default tiny model: a short GRPO run against a random policy.

    python benchmarks/tasks.py [--steps 20] [--envs frozenlake sokoban countdown search_qa textworld]

For each environment, one run of ``python -m grpo_lab.train env=NAME trainer.total_steps=STEPS``
(format warm-up, then GRPO; everything else at the defaults and the environment's
config), and, beside it, a uniformly random legal policy on the same evaluation budget.
Prints one table: evaluation success after the warm-up and after RL, the random policy's
success, and the wall-clock seconds per RL step (rollout and update). The dataset task
needs your data and a real model, so it is left out.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_ENVS = ["frozenlake", "sokoban", "countdown", "search_qa", "textworld"]


def random_policy_success(name: str, kwargs: dict, max_steps: int, episodes: int, seed: int = 0) -> float:
    """Success of uniformly random legal actions over ``episodes`` episodes."""
    from grpo_lab.envs import make_env

    env, rng, won = make_env(name, **kwargs), random.Random(seed), 0
    for _ in range(episodes):
        env.reset(rng.randrange(2**31))
        for _ in range(max_steps):
            result = env.step(rng.choice(env.legal_actions()))
            if result.done:
                won += bool(result.info.get("won"))
                break
    close = getattr(env, "close", None)
    if callable(close):
        close()
    return won / episodes


def env_config(name: str, extra: list[str]):
    from grpo_lab.train import compose_config

    return compose_config([f"env={name}", *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--envs", nargs="+", default=DEFAULT_ENVS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.envs:
            extra = [f"trainer.total_steps={args.steps}", f"trainer.seed={args.seed}", *args.overrides]
            if name == "textworld":
                extra.append(f"env.kwargs.cache_dir={Path(tmp) / 'textworld'}")
            cfg = env_config(name, extra)
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "grpo_lab.train", f"env={name}", f"hydra.run.dir={out}", "logger.progress_bar=false",
                   "logger.wandb=false", "trainer.save_final=false", *extra]
            print("running:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            summary = json.loads((out / "summary.json").read_text())
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            per_step = sum(r["rollout_time"] + r["update_time"] for r in records) / len(records)
            rand = random_policy_success(name, dict(cfg.env.kwargs), cfg.env.max_steps, cfg.trainer.eval_episodes)
            rows.append((name, summary["eval_after_warmup"]["success_rate"], summary["eval_final"]["success_rate"], rand,
                         per_step, wall))
    print(f"| env | eval success after warm-up | after {args.steps} GRPO steps | random legal policy | s per RL step | "
          "run wall-clock (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, before, after, rand, per_step, wall in rows:
        print(f"| {name} | {before:.3f} | {after:.3f} | {rand:.3f} | {per_step:.2f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
