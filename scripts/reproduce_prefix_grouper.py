"""Prefix Grouper (Liu et al., 2025, "Prefix Grouper: Efficient GRPO Training through
Shared-Prefix Forward") in the training update of real runs: the shared-prefix forward
(``trainer.packing=group``) against the plain forward, on the same batches.

    python scripts/reproduce_prefix_grouper.py [--steps 3] [--seeds 0] [--group-sizes 4 8 16]
                                               [--system-repeats 1 4 12] [--quick] [--results benchmarks/RESULTS.md]

For each group size G and prompt length, a trainer runs countdown (single turn: the G
answers of a task share its whole prompt) with a long system text opening every prompt
(``rollout.system_prompt``: ``--system-repeats`` copies of a paragraph of rules), so the
prefix P dominates the answer R. A small entropy bonus (``algo.entropy_coef=0.001``)
makes the update train on every row, so its cost does not depend on which groups
happened to carry a learning signal. Each step collects one rollout batch, then runs the
update twice from the same weights and optimizer state: with the plain forward (every
row repeats its prompt) and with the shared-prefix forward (each group's prompt once).
The two updates must give the same loss (relative 1e-5), gradient norm and gradients
(asserted; the run continues from the shared-prefix update). Reported: mean P and R of the
rows the update trains on, update seconds of each forward (median over steps, both
measured in the same process one after the other), the token-wise forward FLOPs
(2 x non-embedding parameters x tokens processed; attention left out), and the FLOP
model's ideal G(P+R)/(P+GR).
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import COMMON, options, plot, report, table  # noqa: E402

PARAGRAPH = ("Rules of the game. You are given a few numbers and a target number. Write one arithmetic expression "
             "that uses each given number at most once, with plus, minus, times, divide and parentheses, and whose value "
             "is exactly the target. Write the expression inside answer tags and nothing else. ")


def config_for(group_size: int, repeats: int, seed: int, steps: int, quick: bool, overrides: list[str]):
    from grpo_lab.train import compose_config

    extra = [f"algo.group_size={group_size}", "trainer.tasks_per_step=4", f"trainer.total_steps={steps}",
             f"trainer.seed={seed}", "trainer.eval_episodes=0", "trainer.warmup.steps=20", "algo.entropy_coef=0.001",
             *COMMON]
    if quick:
        extra += ["trainer.warmup.steps=2", "trainer.tasks_per_step=2"]
    cfg = compose_config(["env=countdown", *extra, *overrides])
    cfg.rollout.system_prompt = (PARAGRAPH * repeats).strip()
    return cfg


def measure(group_size: int, repeats: int, seed: int, steps: int, quick: bool, overrides: list[str]) -> dict:
    """Run ``steps`` steps; per step, time both updates on the same batch and check they agree."""
    from grpo_lab.trainer import Trainer
    from grpo_lab.training.packing import PACKINGS

    cfg = config_for(group_size, repeats, seed, steps, quick, overrides)
    trainer = Trainer(cfg, output_dir=Path(tempfile.mkdtemp(prefix="prefix_grouper_")))
    trainer.warmup()
    params = sum(p.numel() for n, p in trainer.model.named_parameters() if "embed" not in n and "lm_head" not in n)
    out = {"plain": [], "shared": [], "P": [], "R": [], "tokens_plain": 0, "tokens_shared": 0, "rows": 0, "losses": []}
    for step in range(steps):
        batch = trainer.collect(step)
        adv = trainer.advantages(batch).advantages
        groups: dict[int, list[int]] = {}  # with an entropy term the update trains on every row
        for i, g in enumerate(batch.group_id.tolist()):
            groups.setdefault(g, []).append(i)
        for rows in groups.values():  # a single-turn group shares its whole prompt
            prompt = len(batch.prompt_ids[rows[0]])
            answers = [len(batch.response_ids[i]) for i in rows]
            out["P"] += [prompt] * len(rows)
            out["R"] += answers
            out["tokens_plain"] += sum(prompt + r for r in answers)
            out["tokens_shared"] += prompt + sum(answers)
        out["rows"] += len(batch)
        start_model = copy.deepcopy(trainer.model.state_dict())
        start_optim = copy.deepcopy(trainer.parts.optimizer.state_dict())
        start_sched = copy.deepcopy(trainer.parts.lr_scheduler.state_dict())
        results = {}
        for mode in ("plain", "shared"):
            trainer.model.load_state_dict(start_model)
            trainer.parts.optimizer.load_state_dict(start_optim)
            trainer.parts.lr_scheduler.load_state_dict(start_sched)
            trainer.policy_update.packing = PACKINGS["group" if mode == "shared" else "none"]
            t0 = time.perf_counter()
            metrics = trainer.policy_update(batch, adv)
            out[mode].append(time.perf_counter() - t0)
            # the gradient of the (single) mini-batch is still on the parameters after the step
            results[mode] = (metrics, {n: q.grad.detach().clone() for n, q in trainer.model.named_parameters()
                                       if q.grad is not None})
        (m_plain, w_plain), (m_shared, w_shared) = results["plain"], results["shared"]
        if m_plain.get("num_updates"):
            assert abs(m_plain["loss"] - m_shared["loss"]) <= 1e-5 * max(abs(m_plain["loss"]), 1e-3), (m_plain, m_shared)
            assert abs(m_plain["grad_norm"] - m_shared["grad_norm"]) <= 1e-4 * max(m_plain["grad_norm"], 1e-6)
            assert w_plain.keys() == w_shared.keys()
            for name in w_plain:  # Adam's step hides gradient errors (it divides by their size): compare gradients
                scale = float(w_plain[name].abs().max())
                worst = float((w_plain[name] - w_shared[name]).abs().max())
                assert worst <= 1e-4 * scale + 1e-8, f"{name}: gradients of the two updates differ by {worst} (max {scale})"
            out["losses"].append((m_plain["loss"], m_shared["loss"]))
        trainer.push_weights(step + 1)
    trainer.envs.clear()
    out["params"] = params
    return out


def main() -> None:
    args = options(__doc__, steps=3, seeds=[0], more=lambda p: (
        p.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8, 16]),
        p.add_argument("--system-repeats", type=int, nargs="+", default=[1, 4, 12],
                       help="copies of the rules paragraph in the system text (prompt length)")))
    if args.quick:
        args.group_sizes, args.system_repeats = args.group_sizes[:1], args.system_repeats[:1]
    header = ["G", "mean P", "mean R", "rows trained", "plain update (s)", "shared update (s)", "speedup",
              "forward GFLOPs plain", "forward GFLOPs shared", "FLOP ratio", "ideal G(P+R)/(P+GR)", "max loss diff"]
    rows, speed, ideal_curve = [], {}, {}
    for repeats in args.system_repeats:
        for g in args.group_sizes:
            measured = []
            for seed in args.seeds:
                command = ["python", "scripts/reproduce_prefix_grouper.py", "--group-sizes", str(g), "--system-repeats",
                           str(repeats), "--steps", str(args.steps), "--seeds", str(seed), *(["--quick"] if args.quick else []),
                           *args.overrides]
                print("$ " + " ".join(command), file=sys.stderr, flush=True)
                measured.append(measure(g, repeats, seed, args.steps, args.quick, args.overrides))
            plain = statistics.median(t for m in measured for t in m["plain"])
            shared = statistics.median(t for m in measured for t in m["shared"])
            p = statistics.fmean(x for m in measured for x in m["P"]) if any(m["P"] for m in measured) else float("nan")
            r = statistics.fmean(x for m in measured for x in m["R"]) if any(m["R"] for m in measured) else float("nan")
            flops = [2 * measured[0]["params"] * sum(m[key] for m in measured) / 1e9 for key in ("tokens_plain", "tokens_shared")]
            ideal = g * (p + r) / (p + g * r)
            diff = max((abs(a - b) for m in measured for a, b in m["losses"]), default=float("nan"))
            rows.append([g, f"{p:.0f}", f"{r:.1f}", sum(m["rows"] for m in measured), f"{plain:.3f}", f"{shared:.3f}",
                         f"{plain / shared:.2f}x", f"{flops[0]:.2f}", f"{flops[1]:.2f}",
                         f"{flops[0] / max(flops[1], 1e-12):.2f}x", f"{ideal:.2f}x", f"{diff:.1e}"])
            speed.setdefault(f"measured, P={p:.0f}", []).append(plain / shared)
            ideal_curve.setdefault(f"ideal, P={p:.0f}", []).append(ideal)
    gs = [float(g) for g in args.group_sizes]
    series = {label: [values] for label, values in {**speed, **ideal_curve}.items()}
    png = plot(args.out / "plot.png", [("shared-prefix update speedup", "plain time / shared time", series, "group size G",
                                        {label: [gs] for label in series}, True)])
    body = ("Median update time over the steps of each setting (the first step included); the shared-prefix and plain "
            "updates run on the same batch from the same state, and their losses, gradient norms and gradients "
            "agree (asserted). Every row is trained (entropy bonus 0.001).\n\n"
            + table(header, rows))
    report(args, "Prefix Grouper: the shared-prefix forward in the training update", body, png=png)


if __name__ == "__main__":
    main()
