"""Lock-step against asynchronous training on engines in their own processes.

    python benchmarks/async_training.py [--steps 6] [--latency 0 0.05] [--staleness 1] [--engines 1] [--colocated]
        [overrides...]

For each environment latency (seconds slept in every environment step, standing for a
tool call, a web page, a sandbox; the environments run in the trainer's process,
``rollout.env_workers=0``, as this script defines its own), the same run is made twice with ``rollout.engines``
engine processes: lock-step (``trainer.async=false``) and asynchronous
(``trainer.async=true rollout.max_staleness=K``). A step's time is what the trainer spent
on it: waiting for its rollout (all of the rollout when lock-step) plus the update and the
push. Reported per run: mean step time, rollout wait, update, mean staleness and the
final success rate (``--colocated`` adds the run that generates in the trainer's
process, the default); the ratio of lock-step to async step time (> 1: async is faster), and
the ideal ratio, lock-step's rollout and update overlapped perfectly: (r + u) / max(r, u).

On a CPU the engine processes and the trainer share the same cores, so the overlap is
bounded by them; environment latency (waiting, not computing) is what overlaps freely.
On a GPU machine the engines take their own GPUs (``CUDA_VISIBLE_DEVICES`` per engine is
the launcher's; see docs/cluster.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from grpo_lab.envs import env_names, register_env
from grpo_lab.envs.frozenlake import FrozenLakeEnv


class LaggyLake(FrozenLakeEnv):
    """FrozenLake whose every step waits ``latency`` seconds first."""

    def __init__(self, latency: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.latency = latency

    def step(self, action):
        time.sleep(self.latency)
        return super().step(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--staleness", type=int, default=1)
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--colocated", action="store_true",
                        help="also the colocated run (generation in the trainer's process, rollout.engines=0)")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    return parser.parse_args(argv)


def run(overrides: list[str], out: Path) -> dict:
    from grpo_lab.train import compose_config
    from grpo_lab.trainer import Trainer

    config = compose_config([*overrides, f"trainer.output_dir={out}"])
    summary = Trainer(config).train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records  # the first step waits for the engines to warm up in both modes
    wait = [r.get("rollout_wait_time", r["rollout_time"]) for r in timed]
    update = [r["update_time"] for r in timed]
    return {"step": statistics.mean(w + u for w, u in zip(wait, update)), "wait": statistics.mean(wait),
            "update": statistics.mean(update), "staleness": statistics.mean(r.get("staleness_mean", 0.0) for r in timed),
            "success": (summary.get("eval_final") or {}).get("success_rate", float("nan"))}


def main() -> None:
    args = parse_args()
    if "laggy_lake" not in env_names():
        register_env("laggy_lake", LaggyLake)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="grpo_lab_async_"))
    common = [f"trainer.total_steps={args.steps}", "env.name=laggy_lake",
              "rollout.request_seeds=true", "rollout.env_workers=0", "trainer.warmup.steps=20", "trainer.eval_episodes=16",
              "logger.progress_bar=false", "logger.wandb=false", "logger.plot=false", "trainer.save_final=false",
              *args.overrides]
    rows = []
    for latency in args.latency:
        env = [f"+env.kwargs.latency={latency}"]
        results = {}
        engines = f"rollout.engines={args.engines}"
        modes = [("colocated", ["rollout.engines=0"])] if args.colocated else []
        modes += [("lock-step", [engines]),
                  (f"async k={args.staleness}", [engines, "trainer.async=true", f"rollout.max_staleness={args.staleness}"])]
        for mode, extra in modes:
            results[mode] = run([*common, *env, *extra], root / f"latency{latency}_{mode.split()[0]}")
            rows.append((latency, mode, results[mode]))
        sync, asy = results["lock-step"], results[f"async k={args.staleness}"]
        rows.append((latency, "ratio lock-step / async step time", {"step": sync["step"] / asy["step"]}))
        ideal = sync["step"] / max(sync["wait"], sync["update"])  # rollout and update fully overlapped
        rows.append((latency, "ideal ratio (r + u) / max(r, u)", {"step": ideal}))
    print(f"\n{'env latency (s)':>15} | {'mode':<34} | {'step (s)':>8} | {'wait (s)':>8} | {'update (s)':>10} | "
          f"{'staleness':>9} | {'success':>7}")
    print("-" * 110)
    for latency, mode, r in rows:
        cells = [f"{r[k]:.3f}" if k in r else "" for k in ("step", "wait", "update", "staleness", "success")]
        print(f"{latency:>15g} | {mode:<34} | {cells[0]:>8} | {cells[1]:>8} | {cells[2]:>10} | {cells[3]:>9} | "
              f"{cells[4]:>7}")
    print(f"\nruns in {root}")


if __name__ == "__main__":
    main()
