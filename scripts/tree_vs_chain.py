"""Tree-GRPO (Ji et al., 2025): tree sampling against chains at an equal number of
trajectories per task, with the tokens and tool calls each spends.

    python scripts/tree_vs_chain.py [--steps 30] [--seeds 0]

Chains: GRPO with 8 episodes per task. Trees: Tree-GRPO with M=2 trees per task, one
expansion round of N=3 nodes per tree (2 x (1 + 3) = 8 leaves per task), nodes at the
agent-step level. A continuation shares the path above its branching node, so trees
generate fewer tokens and make fewer tool calls for the same number of trajectories;
the table shows how many, and the evaluation success both reach.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import eval_span, mean_of, parse_args, run_all  # noqa: E402

from grpo_lab.config import AlgoConfig, Config
from grpo_lab.rollout.tree import TreeSamplerConfig  # noqa: E402


def configs(steps: int, seed: int) -> dict[str, Config]:
    chain = Config()
    chain.trainer.total_steps, chain.trainer.seed = steps, seed
    tree = Config()
    tree.trainer.total_steps, tree.trainer.seed = steps, seed
    tree.algo = AlgoConfig(estimator="tree_grpo")
    tree.rollout.sampler = "tree"
    tree.rollout.tree = TreeSamplerConfig(trees_per_prompt=2, rounds=1, nodes_per_round=3, node="step")
    return {"chains (GRPO, 8 per task)": chain, "trees (Tree-GRPO, M=2 L=1 N=3)": tree}


def main() -> None:
    args = parse_args(__doc__)
    rows = run_all(configs, args.steps, args.seeds)
    print(f"\n{args.steps} steps x 8 tasks, FrozenLake, seeds {args.seeds}")
    print("| run | trajectories per task | generated tokens per step | env steps per step (chains: turns, an upper bound) | eval success (start -> end) |")
    print("|---|---:|---:|---:|---|")
    for name, runs in rows.items():
        recs = [r["records"] for r in runs]
        per_task = statistics.fmean(mean_of(r, "responses_per_prompt") for r in recs)
        tokens = statistics.fmean(mean_of(r, "response_tokens") for r in recs)
        # chains: every row with a parsed action stepped the env; rows = turns (upper bound)
        env_steps = statistics.fmean(mean_of(r, "rollout_env_steps") if "rollout_env_steps" in r[0] else mean_of(r, "num_rows")
                                     for r in recs)
        print(f"| {name} | {per_task:.2f} | {tokens:,.0f} | {env_steps:.1f} | {eval_span(runs)} |")


if __name__ == "__main__":
    main()
