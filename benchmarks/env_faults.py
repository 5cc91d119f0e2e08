"""What an environment fault costs a rollout, and what worker processes cost a clean one.

    python benchmarks/env_faults.py [--tasks 16] [--group 4] [--max-steps 10] [--timeout 1.0]

One workload (``--tasks`` FrozenLake tasks x ``--group`` episodes, up to ``--max-steps``
turns, answers drawn at random by a backend that costs nothing, so the table measures
the environments alone) is played, side by side in one run:

- in process (``rollout.env_workers=0``) and in 2 worker processes, fault-free: the
  price of isolation on a clean rollout;
- in 2 worker processes with one fault of each kind in one episode: a raise, a NaN
  reward, a hang (abandoned after ``--timeout`` s), a worker that dies.

The table gives wall-clock, episodes dropped, groups dropped, workers replaced, and the
environments rebuilt by replay (with their replayed steps). Each row's extra seconds over
the clean worker rollout are what the fault cost.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from grpo_lab.envs import FrozenLakeEnv  # noqa: E402  (the rest is imported in main: workers import this module)


class BrokenLake(FrozenLakeEnv):
    """FrozenLake where the episode of seed ``bad_seed`` fails at its second step, as
    ``fault`` says: ``raise``, ``nan``, ``hang`` or ``die``."""

    def __init__(self, fault: str = "none", bad_seed: int = -1, marker: str = "", **kwargs):
        super().__init__(**kwargs)
        self.fault, self.bad_seed, self.marker = fault, bad_seed, marker

    def reset(self, seed):
        self._seed, self._n = seed, 0
        return super().reset(seed)

    def step(self, action):
        self._n += 1
        fire = self._seed == self.bad_seed and self._n == 2 and self.fault != "none" and self._member_is_first()
        if fire:
            if self.fault == "raise":
                raise RuntimeError("simulated crash")
            if self.fault == "hang":
                time.sleep(3600)
            if self.fault == "die":
                os._exit(1)
        result = super().step(action)
        if fire and self.fault == "nan":
            return type(result)(result.observation, float("nan"), result.done, result.info)
        return result

    def _member_is_first(self) -> bool:
        """True for the first episode to get here, in any process (it creates the marker)."""
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            return True
        except (FileExistsError, FileNotFoundError):
            return False


class RandomBackend:  # noqa: D101
    """Answers a random move (or, one time in eight, nothing parseable); no model."""

    def __init__(self, seed: int = 0):
        from grpo_lab.rollout.backend import Completion

        self.rng, self.completion = random.Random(seed), Completion

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            h = zlib.crc32(bytes(str(len(p)), "utf8")) ^ self.rng.getrandbits(16)
            move = ["left", "right", "up", "down", None, "down", "right", "right"][h % 8]
            text = f"<action>{move}</action>" if move else "hmm"
            out.append(self.completion([1, 2, 3], [-0.1, -0.1, -0.1], text=text))
        return out


class IdEncoder:
    """Prompt 'tokens' without a tokenizer: one id per character, enough for the loop."""

    class tokenizer:  # noqa: N801
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return ""

    def encode(self, text):
        return list(range(len(text)))


def run(spec, workers: int, args, seeds):
    from grpo_lab.rollout import AgentLoopConfig, SamplingParams, run_episodes
    from grpo_lab.rollout.env_pool import EnvRunner
    from grpo_lab.rollout.faults import FaultLog

    runner = EnvRunner(spec, workers, args.timeout)
    runner.start()
    faults = FaultLog()
    config = AgentLoopConfig(group_size=args.group, max_steps=args.max_steps, history_window=1,
                             sampling=SamplingParams(max_tokens=8), env_threads=workers)
    t0 = time.perf_counter()
    run_episodes(RandomBackend(), IdEncoder(), runner, seeds, config, faults=faults)
    seconds = time.perf_counter() - t0
    runner.close()
    return seconds, faults, runner.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()
    from env_faults import BrokenLake as Lake  # importable by name in the worker processes (not __main__)
    from grpo_lab.envs import env_names, register_env
    from grpo_lab.rollout.env_pool import EnvSpec

    if "broken_lake" not in env_names():
        register_env("broken_lake", Lake)
    seeds = [random.Random(k).randrange(2**31) for k in range(args.tasks)]
    rows = []
    for label, fault, workers in (("in process, clean", "none", 0), ("2 workers, clean", "none", 2),
                                  ("2 workers, one raise", "raise", 2), ("2 workers, one NaN reward", "nan", 2),
                                  (f"2 workers, one hang ({args.timeout:g} s timeout)", "hang", 2),
                                  ("2 workers, one worker dies", "die", 2)):
        marker = os.path.join(tempfile.mkdtemp(), "fired")
        spec = EnvSpec("broken_lake", Lake, {"fault": fault, "bad_seed": seeds[0], "marker": marker})
        seconds, faults, stats = run(spec, workers, args, seeds)
        rows.append((label, seconds, faults, stats))
    clean = rows[1][1]
    episodes = args.tasks * args.group
    print(f"{episodes} episodes ({args.tasks} tasks x {args.group}), up to {args.max_steps} turns, no model\n")
    print("| rollout | seconds | vs clean (2 workers) | episodes dropped | groups dropped | workers replaced | envs replayed (steps) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, seconds, faults, stats in rows:
        print(f"| {label} | {seconds:.3f} | {seconds - clean:+.3f} s | {faults.episodes_dropped} | {faults.groups_dropped} | "
              f"{stats.workers_replaced} | {stats.envs_replayed} ({stats.replayed_steps}) |")
    print(f"\nworker processes / in process, clean: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
