"""R³ (Jiang et al. 2026, "Replay, Reflection, and Ranking Rewards for LLM Reinforcement
Learning") against GRPO on countdown, where a tiny model's groups are mostly all-fail.

    python scripts/reproduce_r3.py [--steps 30] [--seeds 0 1 2] [--quick] [--results benchmarks/RESULTS.md]

All three start from the same format warm-up and run the same steps of 8 tasks x 8
episodes on a fixed pool of 64 countdown tasks (``env.kwargs.num_tasks=64``), so that
tasks come back and have a history to replay:

- GRPO (``rollout.sampler=chain``);
- GRPO + replay: ``rollout.sampler=r3`` with reflection and the ranking reward off: a
  group whose 8 episodes all failed (all succeeded) takes up to 2 past successes
  (failures) of its task, trained off-policy with their advantages times alpha = 0.5;
- R³: replay, reflection (tasks whose last 4 episodes average below 0.2 see their last 2
  failed attempts) and the entropy ranking reward (failed answers graded in [0, 0.1]).

Reported, mean ± std over seeds: the share of groups whose episodes all ended alike (no
outcome signal) and the share of groups with a learning signal after replay (advantages
not all zero: the ranking reward gives all-fail groups one too), replayed and reflected
episodes per step, training success in the last 5 steps (the step's own episodes;
replayed ones are left out), and evaluation success and pass@k (4 samples of each of 64
tasks, drawn from the same pool, without reflection) after the warm-up and at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import Run, curves, labels, options, plot, report, select, spread, table, train_all, window_mean  # noqa: E402

TASKS = {"countdown": ["env=countdown", "env.kwargs.num_tasks=64", "trainer.eval_samples=4"],
         "countdown, 2 numbers": ["env=countdown", "env.kwargs.num_tasks=64", "env.kwargs.num_numbers=2",
                                  "trainer.eval_samples=4"]}
METHODS = {
    "GRPO": [],
    "GRPO + replay": ["rollout.sampler=r3", "rollout.r3.reflection_threshold=null", "rollout.r3.rank_reward=0"],
    "R3 (replay, reflection, ranking)": ["rollout.sampler=r3"],
}


def runs(steps: int, seeds: list[int]) -> list[Run]:
    return [Run(method, task, seed, [*env, *extra, f"trainer.total_steps={steps}"])
            for task, env in TASKS.items() for seed in seeds for method, extra in METHODS.items()]


def main() -> None:
    args = options(__doc__, steps=30, seeds=[0, 1, 2])
    results = train_all(runs(args.steps, args.seeds), args)
    header = ["task", "method", "groups all alike", "groups with signal", "replayed per step", "reflected per step",
              "train success, last 5 steps", "eval success after warm-up", "eval success at end", "pass@2 at end",
              "pass@4 at end"]
    rows, panels = [], []
    for task in labels(results, "task"):
        success, signal = {}, {}
        for method in labels(results, "method"):
            rs = select(results, task=task, method=method)
            rows.append(row(task, method, rs))
            success[method] = curves(rs, "success_rate")
            signal[method] = [[1 - v for v in r.series("frac_zero_std_groups")] for r in rs]
        panels += [(f"{task}: training success", "success rate", success),
                   (f"{task}: groups with a learning signal", "share of groups", signal)]
    png = plot(args.out / "plot.png", panels)
    body = (f"Mean ± std over seeds {args.seeds}; {args.steps} steps of 8 tasks x 8 episodes from a pool of 64 "
            "countdown tasks; evaluation: 4 samples of each of `trainer.eval_episodes` (64) tasks of the pool. "
            "Groups all alike: every episode of the group failed, or every one succeeded (before replay); groups "
            "with signal: the advantages not all zero (after replay; the invalid-action penalty and the ranking "
            "reward also give a group one).\n\n" + table(header, rows))
    report(args, "R3 (replay, reflection, ranking reward) against GRPO on countdown", body, results, png)


def row(task: str, method: str, rs: list) -> list[str]:
    return [task, method, spread([r.per_step("groups_all_alike") for r in rs], 2), spread([1 - r.per_step("frac_zero_std_groups") for r in rs], 2),
            spread([r.per_step("r3_replayed_episodes") for r in rs], 2),
            spread([r.per_step("r3_reflected_episodes") for r in rs], 2),
            spread([window_mean(r.series("success_rate"), False) for r in rs]),
            spread([r.eval("eval_after_warmup") for r in rs]), spread([r.eval("eval_final") for r in rs]),
            spread([r.eval("eval_final", "pass@2") for r in rs]), spread([r.eval("eval_final", "pass@4") for r in rs])]


if __name__ == "__main__":
    main()
