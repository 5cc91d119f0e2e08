"""ToolRL (Qian et al. 2025, "ToolRL: Reward is All Tool Learning Needs"): GRPO with the
fine-grained tool-call reward against GRPO with an exact-match reward, on generated
function-calling tasks (``env=tool_calls``).

    python scripts/reproduce_toolrl.py [--steps 30] [--seeds 0 1 2] [--quick] [--results benchmarks/RESULTS.md]

Both start from the same format warm-up (well-formed answers with random calls) and run
the same steps of 8 tasks x 8 answers. The fine-grained reward is ToolRL's: format (0 or
1) plus the correctness of tool names, parameter names and values mapped onto [-3, 3];
the exact-match reward is 1 for an answer whose format and calls are exactly right,
else 0 (the coarse reward of the paper's ablation). Reported, mean ± std over seeds:
the exact-call accuracy (the share of answers exactly right) in the last 5 training steps
and on 64 held-out tasks after the warm-up and at the end, the format rate (answers with
the right structure) and the mean correctness score in the last 5 steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import Run, curves, labels, options, plot, report, select, spread, table, train_all, window_mean  # noqa: E402

TASK = ["env=tool_calls"]
METHODS = {"GRPO, ToolRL reward": ["env.kwargs.reward=toolrl"], "GRPO, exact match": ["env.kwargs.reward=exact"]}


def runs(steps: int, seeds: list[int]) -> list[Run]:
    return [Run(method, "tool_calls", seed, [*TASK, *extra, f"trainer.total_steps={steps}"])
            for seed in seeds for method, extra in METHODS.items()]


def main() -> None:
    args = options(__doc__, steps=30, seeds=[0, 1, 2])
    results = train_all(runs(args.steps, args.seeds), args)
    header = ["method", "exact calls, last 5 steps", "format rate, last 5 steps", "correctness, last 5 steps",
              "eval exact after warm-up", "eval exact at end"]
    rows, accuracy, fmt = [], {}, {}
    for method in labels(results, "method"):
        rs = select(results, method=method)
        rows.append([method, spread([window_mean(r.series("success_rate"), False) for r in rs]),
                     spread([window_mean(r.series("reward/format"), False) for r in rs]),
                     spread([window_mean(r.series("reward/correctness"), False) for r in rs], 2),
                     spread([r.eval("eval_after_warmup") for r in rs]), spread([r.eval("eval_final") for r in rs])])
        accuracy[method] = curves(rs, "success_rate")
        fmt[method] = curves(rs, "reward/format")
    png = plot(args.out / "plot.png", [("tool_calls: exact-call accuracy", "share of answers", accuracy),
                                       ("tool_calls: format rate", "share of answers", fmt)])
    body = (f"Mean ± std over seeds {args.seeds}; {args.steps} steps of 8 tasks x 8 answers; evaluation on "
            "`trainer.eval_episodes` (64) held-out tasks, one answer each (exact calls).\n\n" + table(header, rows))
    report(args, "ToolRL's fine-grained reward against exact match on generated function calling", body, results, png)


if __name__ == "__main__":
    main()
