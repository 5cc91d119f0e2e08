"""GiGPO (Feng et al., 2025, "Group-in-Group Policy Optimization for LLM Agent Training")
against GRPO on Sokoban and on FrozenLake with a random map per task.

    python scripts/reproduce_gigpo.py [--steps 30] [--seeds 0 1 2] [--quick] [--results benchmarks/RESULTS.md]

Both methods train the default tiny model from the same format warm-up (same seed, same
demonstrations), on the same tasks (8 per step, 8 episodes each), for the same number of
steps; they differ in ``algo`` alone. Reported per task and method, mean ± std over
seeds: training success in the first and last 5 steps, evaluation success (64 held-out
tasks) after the warm-up and at the end, invalid-action rate and episode length at the
end, seconds per step, and for GiGPO the share of step rows whose anchor state recurs in
their episode group (``frac_rows_in_shared_step_groups``: the rows whose step-level
advantage compares actions; the paper's anchor-repetition statistic). The plot shows
training success and invalid-action rate per step.

The paper's gains (+12% success on ALFWorld, +9% on WebShop over GRPO) are for
Qwen2.5-1.5B/7B-Instruct trained for 150-200 steps of 16 tasks x 8 episodes with
50-step episodes; this script runs a 2-layer model built locally for a few dozen steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import Run, curves, labels, options, plot, report, select, spread, table, train_all, window_mean  # noqa: E402

TASKS = {
    "sokoban": ["env=sokoban"],
    "frozenlake (random maps)": ["env=frozenlake", "env.kwargs.map_mode=random"],
}
METHODS = {"GRPO": ["algo=grpo"], "GiGPO": ["algo=gigpo"]}


def runs(steps: int, seeds: list[int]) -> list[Run]:
    return [Run(method, task, seed, [*env, *algo, f"trainer.total_steps={steps}"])
            for task, env in TASKS.items() for seed in seeds for method, algo in METHODS.items()]


def main() -> None:
    args = options(__doc__, steps=30, seeds=[0, 1, 2])
    results = train_all(runs(args.steps, args.seeds), args)
    header = ["task", "method", "train success, first 5 steps", "train success, last 5 steps",
              "eval success after warm-up", "eval success at end", "eval invalid-action rate at end",
              "eval episode length at end", "rows in shared step groups", "s per step"]
    rows, panels = [], []
    for task in labels(results, "task"):
        success, invalid = {}, {}
        for method in labels(results, "method"):
            rs = select(results, task=task, method=method)
            shared = [window_mean(r.series("frac_rows_in_shared_step_groups"), first=False, n=len(r.records)) for r in rs]
            rows.append([task, method, spread([window_mean(r.series("success_rate"), True) for r in rs]),
                         spread([window_mean(r.series("success_rate"), False) for r in rs]),
                         spread([r.eval("eval_after_warmup") for r in rs]), spread([r.eval("eval_final") for r in rs]),
                         spread([r.eval("eval_final", "invalid_action_rate") for r in rs]),
                         spread([r.eval("eval_final", "episode_length") for r in rs], 2),
                         spread(shared, 2),
                         spread([r.per_step("rollout_time") + r.per_step("update_time") for r in rs], 1)])
            success[method], invalid[method] = curves(rs, "success_rate"), curves(rs, "invalid_action_rate")
        panels += [(f"{task}: training success", "success rate", success),
                   (f"{task}: invalid-action rate", "share of steps", invalid)]
    png = plot(args.out / "plot.png", panels)
    body = (f"Mean ± std over seeds {args.seeds}. Each run: the format warm-up, then {args.steps} steps of "
            "`trainer.tasks_per_step` tasks x `algo.group_size` episodes (8 x 8 unless the commands say otherwise); "
            "evaluation on `trainer.eval_episodes` held-out tasks (64), one episode each.\n\n" + table(header, rows))
    report(args, "GiGPO against GRPO", body, results, png)


if __name__ == "__main__":
    main()
