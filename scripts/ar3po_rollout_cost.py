"""AR3PO (Zhang et al., 2025): rollout cost of adaptive rollout with response reuse
against plain GRPO at the same number of steps.

    python scripts/ar3po_rollout_cost.py [--steps 30] [--seeds 0 1]

Both runs train the default FrozenLake agent from the same warm-up for ``--steps`` steps:
GRPO with 8 episodes per task, AR3PO with up to 2 stages of 4 (a task leaves after a
win) and reuse of buffered wins. The table gives episodes per task, generated tokens,
rollout seconds, groups without signal, and the evaluation success at the end (mean over
``--seeds``).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import eval_span, mean_of, parse_args, run_all, total_of  # noqa: E402

from grpo_lab.config import Config
from grpo_lab.rollout.adaptive import AdaptiveConfig  # noqa: E402


def configs(steps: int, seed: int) -> dict[str, Config]:
    grpo = Config()
    grpo.trainer.total_steps, grpo.trainer.seed = steps, seed
    ar3po = Config()
    ar3po.trainer.total_steps, ar3po.trainer.seed = steps, seed
    ar3po.rollout.sampler = "adaptive"
    ar3po.rollout.adaptive = AdaptiveConfig(stages=2, responses_per_stage=4, reuse=True)
    return {"GRPO (G=8)": grpo, "AR3PO (2 stages x 4, reuse)": ar3po}


def main() -> None:
    args = parse_args(__doc__)
    rows = run_all(configs, args.steps, args.seeds)
    print(f"\n{args.steps} steps x 8 tasks, FrozenLake, seeds {args.seeds}")
    print("| run | episodes per task | generated tokens | rollout s | frac groups without signal | reused | eval success (start -> end) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, runs in rows.items():
        recs = [r["records"] for r in runs]
        per_task = statistics.fmean(mean_of(r, "responses_per_prompt") for r in recs)
        tokens = statistics.fmean(total_of(r, "response_tokens") for r in recs)
        seconds = statistics.fmean(total_of(r, "rollout_time") for r in recs)
        zero = statistics.fmean(mean_of(r, "frac_zero_std_groups") for r in recs)
        reused = statistics.fmean(total_of(r, "ar3po_reused") for r in recs)
        print(f"| {name} | {per_task:.2f} | {tokens:,.0f} | {seconds:.0f} | {zero:.2f} | {reused:.0f} | {eval_span(runs)} |")


if __name__ == "__main__":
    main()
