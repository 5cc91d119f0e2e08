"""Tree-GRPO (Ji et al., 2025, "Tree Search for LLM Agent Reinforcement Learning") trees
against GRPO chains on search_qa, at an equal budget of generated tokens and tool calls.

    python scripts/reproduce_tree_grpo.py [--steps 30] [--seeds 0 1] [--quick] [--results benchmarks/RESULTS.md]

Chains: GRPO with 5 independent episodes per question. Trees: Tree-GRPO with M=2 trees
per question, each grown by one expansion round (L=1) of N=2 continuations branching at
agent-step nodes (``rollout=tree``): up to 6 leaves. A continuation reuses the path above
its branching node, so it costs less than an episode; on this task two trees cost about
what 5 chains cost (a first run against 4 chains measured 1.23x their tokens), which sets
the chains' G. The tree's shared prefixes also give its advantages a step-level
comparison. The table measures the budget each actually spent (generated
tokens, environment steps: searches and answers) and the accuracy (exact match) it
bought; the plot shows training accuracy against the generated tokens spent.

The paper trains Qwen2.5-3B/7B on NQ, HotpotQA and others with an E5 retriever over
Wikipedia; this script runs the default tiny model (2 layers, built locally) on the
synthetic knowledge base of ``env=search_qa`` with BM25.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import Run, curves, labels, options, plot, report, select, spread, table, train_all, window_mean  # noqa: E402

METHODS = {
    "chains (GRPO, G=5)": ["algo=grpo", "algo.group_size=5"],
    "trees (Tree-GRPO, M=2 N=2 L=1)": ["algo=tree_grpo", "rollout=tree", "rollout.tree.trees_per_prompt=2",
                                       "rollout.tree.nodes_per_round=2", "rollout.tree.rounds=1", "rollout.tree.node=step"],
}


def runs(steps: int, seeds: list[int]) -> list[Run]:
    return [Run(method, "search_qa", seed, ["env=search_qa", *extra, f"trainer.total_steps={steps}"])
            for seed in seeds for method, extra in METHODS.items()]


def main() -> None:
    args = options(__doc__, steps=30, seeds=[0, 1])
    results = train_all(runs(args.steps, args.seeds), args)
    header = ["method", "trajectories per question", "generated tokens per step", "env steps per step",
              "tokens per trajectory", "train accuracy, last 5 steps", "eval accuracy after warm-up", "eval accuracy at end",
              "s per step"]
    rows, success, spent = [], {}, {}
    for method in labels(results, "method"):
        rs = select(results, method=method)
        rows.append([method, spread([r.per_step("responses_per_prompt") for r in rs], 2),
                     spread([r.per_step("response_tokens") for r in rs], 0),
                     spread([r.per_step("env_steps") for r in rs], 1),
                     spread([sum(r.series("response_tokens")) / sum(r.series("episodes")) for r in rs], 1),
                     spread([window_mean(r.series("success_rate"), False) for r in rs]),
                     spread([r.eval("eval_after_warmup") for r in rs]), spread([r.eval("eval_final") for r in rs]),
                     spread([r.per_step("rollout_time") + r.per_step("update_time") for r in rs], 1)])
        success[method] = curves(rs, "success_rate")
        spent[method] = [list(itertools.accumulate(r.series("response_tokens"))) for r in rs]
    png = plot(args.out / "plot.png", [("search_qa: training accuracy by tokens spent", "exact match", success,
                                        "generated tokens (cumulative)", spent),
                                       ("search_qa: training accuracy by step", "exact match", success)])
    budget = _ratio(results, "response_tokens"), _ratio(results, "env_steps")
    body = (f"Mean ± std over seeds {args.seeds}; accuracy is the exact match of the answer (the episode's `won`); "
            "evaluation on `trainer.eval_episodes` held-out questions (64), one episode each. Budget spent by trees "
            f"relative to chains: {budget[0]:.2f}x the generated tokens, {budget[1]:.2f}x the environment steps.\n\n"
            + table(header, rows))
    report(args, "Tree-GRPO trees against GRPO chains at equal budget", body, results, png)


def _ratio(results, key: str) -> float:
    chains, trees = (select(results, method=m) for m in METHODS)
    total = lambda rs: sum(sum(r.series(key)) for r in rs)  # noqa: E731
    return total(trees) / max(total(chains), 1e-9)


if __name__ == "__main__":
    main()
