"""AutoRefine (Shi et al. 2025, "Search and Refine During Think"): search-and-refine with
the retrieval reward against plain search with the answer reward only, on ``search_qa``'s
single-hop and multi-hop questions.

    python scripts/reproduce_autorefine.py [--steps 30] [--seeds 0 1 2] [--quick] [--results benchmarks/RESULTS.md]

Both start from the same kind of format warm-up (random well-formed actions of their own
protocol) and run the same steps of 8 questions x 8 episodes, with up to 7 turns an
episode. Search-and-refine (``env.kwargs.refine=true env.kwargs.retrieval_reward=0.1``)
must write ``<refine>`` after each search's passages and earns 0.1 for a wrong answer whose
refined evidence holds the right one; plain search is ``search_qa`` as it is (exact-match
reward). Single-hop: ``max_hops=1``; multi-hop: questions of one to three hops
(``max_hops=3``). Reported, mean ± std over seeds: answer accuracy (exact match) in the
last 5 training steps and on 64 held-out questions at the end, searches per episode, and
the share of refine blocks that hold the answer (last 5 steps).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import Run, curves, labels, options, plot, report, select, spread, table, train_all, window_mean  # noqa: E402

TASKS = {"single-hop": ["env=search_qa", "env.kwargs.max_hops=1", "env.max_steps=7"],
         "multi-hop": ["env=search_qa", "env.kwargs.max_hops=3", "env.max_steps=7"]}
METHODS = {"search + refine, retrieval reward": ["env.kwargs.refine=true", "env.kwargs.retrieval_reward=0.1"],
           "plain search, answer reward": []}


def runs(steps: int, seeds: list[int]) -> list[Run]:
    return [Run(method, task, seed, [*env, *extra, f"trainer.total_steps={steps}"])
            for task, env in TASKS.items() for seed in seeds for method, extra in METHODS.items()]


def counts(result, key: str) -> list[float]:
    """A per-episode count of each step (``env/<name>``; 0 where no step reached the
    environment)."""
    return [v if v == v else 0.0 for v in result.series(key)]


def refine_hit_share(result) -> float:
    """Refine blocks that hold the answer over all refine blocks, in the last 5 steps."""
    blocks = sum(b * e for b, e in zip(counts(result, "env/refines")[-5:], result.series("episodes")[-5:]))
    hits = sum(h * e for h, e in zip(counts(result, "env/refines_with_answer")[-5:], result.series("episodes")[-5:]))
    return hits / blocks if blocks else float("nan")


def searches_per_episode(result) -> float:
    return window_mean(counts(result, "env/searches"), False)


def main() -> None:
    args = options(__doc__, steps=30, seeds=[0, 1, 2])
    results = train_all(runs(args.steps, args.seeds), args)
    header = ["questions", "method", "accuracy, last 5 steps", "eval accuracy after warm-up", "eval accuracy at end",
              "searches per episode", "refine blocks holding the answer"]
    rows, panels = [], []
    for task in labels(results, "task"):
        accuracy = {}
        for method in labels(results, "method"):
            rs = select(results, task=task, method=method)
            rows.append([task, method, spread([window_mean(r.series("success_rate"), False) for r in rs]),
                         spread([r.eval("eval_after_warmup") for r in rs]), spread([r.eval("eval_final") for r in rs]),
                         spread([searches_per_episode(r) for r in rs], 2),
                         spread([refine_hit_share(r) for r in rs]) if "refine" in method else "-"])
            accuracy[method] = curves(rs, "success_rate")
        panels.append((f"{task}: answer accuracy", "exact match", accuracy))
    png = plot(args.out / "plot.png", panels)
    body = (f"Mean ± std over seeds {args.seeds}; {args.steps} steps of 8 questions x 8 episodes, up to 7 turns; "
            "evaluation on `trainer.eval_episodes` (64) held-out questions, one episode each.\n\n" + table(header, rows))
    report(args, "AutoRefine's search-and-refine against plain search on search_qa", body, results, png)


if __name__ == "__main__":
    main()
