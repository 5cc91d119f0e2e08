"""Shared by the reproduction scripts: their options, one training run per command line,
the spread across seeds, and the report (a markdown table and a PNG plot).

Every run is ``python -m grpo_lab.train`` with Hydra overrides, in a subprocess, and its
command line is printed before it starts, so any single run can be repeated alone. A
script's report goes to ``--out`` (``report.md`` and ``plot.png``), to standard output,
and with ``--results FILE`` into FILE between the script's markers
(``<!-- reproduce_x:begin -->`` ... ``<!-- reproduce_x:end -->``), so the numbers in
``benchmarks/RESULTS.md`` are the script's own output.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent

#: overrides of every run: no wandb, no progress bar, no final model
COMMON = ["logger.wandb=false", "logger.progress_bar=false", "trainer.save_final=false"]
#: --quick: a check that the script runs end to end (numbers meaningless)
QUICK = ["trainer.warmup.steps=5", "trainer.warmup.episodes=40", "trainer.eval_episodes=4", "trainer.tasks_per_step=2"]


def options(doc: str | None, *, steps: int, seeds: Sequence[int],
            more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--steps``, ``--seeds``, ``--quick``, ``--out``, ``--results``, ``--reuse``,
    the script's own options (``more(parser)``) and extra Hydra overrides for every run."""
    name = Path(sys.argv[0]).stem
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help="RL steps per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="trainer.seed of the runs")
    parser.add_argument("--quick", action="store_true",
                        help="2 steps of one seed at a tiny evaluation: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=Path("results") / name, help="where the runs and the report go")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"also write the report into this markdown file, between its {name} markers")
    parser.add_argument("--reuse", action="store_true", help="keep the finished runs already in --out (same command)")
    if more is not None:
        more(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every run")
    args = parser.parse_args()
    args.name = name
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.quick:
        args.steps, args.seeds = min(args.steps, 2), args.seeds[:1]
    args.argv = ["python", f"scripts/{name}.py", *sys.argv[1:]]
    return args


@dataclass
class Run:
    """One training run: a method on a task with a seed, as Hydra overrides."""

    method: str
    task: str
    seed: int
    overrides: list[str]

    @property
    def slug(self) -> str:
        text = f"{self.task}-{self.method}-seed{self.seed}".lower()
        return re.sub(r"[^a-z0-9.-]+", "_", text).strip("_")

    def command(self, out: Path) -> list[str]:
        return ["python", "-m", "grpo_lab.train", *self.overrides, f"trainer.seed={self.seed}",
                f"trainer.output_dir={out}", *COMMON]


@dataclass
class Result:
    run: Run
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    seconds: float
    command: str

    def series(self, key: str) -> list[float]:
        """``[steps]``: the metric per step (NaN where a step did not log it)."""
        return [float(r.get(key, math.nan)) for r in self.records]

    def per_step(self, key: str, missing: float = 0.0) -> float:
        """The metric's mean over the steps, ``missing`` for a step that did not log it."""
        return statistics.fmean(float(r.get(key, missing)) for r in self.records)

    def eval(self, when: str, key: str = "success_rate") -> float:
        """An evaluation metric, ``when`` = ``"eval_after_warmup"`` or ``"eval_final"``."""
        return float(self.summary.get(when, {}).get(key, math.nan))


def train(run: Run, args: argparse.Namespace) -> Result:
    """Run ``run`` in ``args.out / run.slug`` (printing its command first); its metrics."""
    out = args.out / run.slug
    overrides = list(run.overrides) + (QUICK if args.quick else []) + list(args.overrides)
    run = Run(run.method, run.task, run.seed, overrides)
    command = shlex.join(run.command(out))
    done = out / "summary.json"
    if args.reuse and done.exists() and (out / "command.txt").exists() and (out / "command.txt").read_text() == command:
        print(f"reusing {out}: {command}", file=sys.stderr, flush=True)
        seconds = json.loads((out / "wall_seconds.json").read_text())
    else:
        if out.exists() and any(out.iterdir()):
            refuse_earlier_runs([out])
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "command.txt").write_text(command)
        print(f"$ {command}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with open(out / "log.txt", "w") as log:
            proc = subprocess.run([sys.executable, *run.command(out)[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = "".join((out / "log.txt").read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"run failed (exit {proc.returncode}): {command}\n{tail}")
        (out / "wall_seconds.json").write_text(json.dumps(seconds))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Result(run, records, json.loads(done.read_text()), seconds, command)


def refuse_earlier_runs(dirs: Sequence[Path]) -> None:
    """Stop with one line: run directories of an earlier invocation are in the way."""
    where = f"{dirs[0]} holds a run" if len(dirs) == 1 else f"{dirs[0]} and {len(dirs) - 1} more hold runs"
    print(f"error: {where} of an earlier invocation: pass --reuse to keep the finished ones (same command), or "
          "--out DIR to write elsewhere", file=sys.stderr)
    raise SystemExit(2)


def train_all(runs: Sequence[Run], args: argparse.Namespace) -> list[Result]:
    """Every run in turn; without ``--reuse``, refuses at once when a run directory of
    an earlier invocation exists (never overwriting it)."""
    if not args.reuse:
        taken = [args.out / run.slug for run in runs if (args.out / run.slug).exists()
                 and any((args.out / run.slug).iterdir())]
        if taken:
            refuse_earlier_runs(taken)
    return [train(run, args) for run in runs]


def select(results: Sequence[Result], **match: Any) -> list[Result]:
    """The results whose run has the given ``method``/``task``/``seed``."""
    return [r for r in results if all(getattr(r.run, k) == v for k, v in match.items())]


def labels(results: Sequence[Result], attr: str) -> list[str]:
    """The distinct values of ``run.<attr>``, in the order the runs were made."""
    return list(dict.fromkeys(getattr(r.run, attr) for r in results))


# ---------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed); NaNs left out."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else 0.0)


def spread(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds, or the value alone for one seed."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def window_mean(series: Sequence[float], first: bool, n: int = 5) -> float:
    """Mean of the first (or last) ``n`` values of a per-step series, NaNs left out."""
    part = list(series[:n] if first else series[-n:])
    kept = [v for v in part if not math.isnan(v)]
    return statistics.fmean(kept) if kept else math.nan


def curves(results: Sequence[Result], key: str) -> list[list[float]]:
    """``[seeds, steps]`` of a step metric."""
    return [r.series(key) for r in results]


# ---------------------------------------------------------------------- report
def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def commands_block(results: Sequence[Result]) -> str:
    """Every run's command line (one line each), to repeat any run alone."""
    lines = "\n".join(r.command for r in results)
    return f"<details><summary>the {len(results)} runs' commands</summary>\n\n```\n{lines}\n```\n</details>"


Panel = tuple  # (title, y label, {label: [seeds, points]}[, x label[, {label: [seeds, points] x values}[, log2 x]]])


def plot(path: Path, panels: Sequence[Panel]) -> Path:
    """One panel per ``(title, y label, {label: [seeds, points]})``, optionally followed
    by the x label (default "RL step"), x values per label (default 0, 1, ...) and
    whether the x axis is log2: the mean over seeds as a line, the range over seeds as
    a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        title, y_label, series = panel[:3]
        x_label = panel[3] if len(panel) > 3 else "RL step"
        xs = panel[4] if len(panel) > 4 else None
        if len(panel) > 5 and panel[5]:
            ax.set_xscale("log", base=2)
        for label, runs in series.items():
            length = min(len(s) for s in runs)
            values = np.array([s[:length] for s in runs], dtype=float)
            x = (np.array([s[:length] for s in xs[label]], dtype=float).mean(axis=0) if xs and label in xs
                 else np.arange(length))
            with np.errstate(all="ignore"):
                mean = np.nanmean(values, axis=0)
            line, = ax.plot(x, mean, label=label)
            if len(runs) > 1:
                ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.2, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(args: argparse.Namespace, title: str, body: str, results: Sequence[Result] = (),
           png: Path | None = None) -> str:
    """Write the report: ``--out/report.md``, standard output, and with ``--results``
    into that file (the plot copied to ``figures/<script>.png`` beside it)."""
    scale = "quick check (2 steps, numbers meaningless)" if args.quick else f"{args.steps} steps, seeds {args.seeds}"
    head = [f"### {title}", "", f"`{shlex.join(args.argv)}` ({scale}; {machine()})", "", body.strip()]
    tail = ["", commands_block(results)] if results else []
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(head + (["", f"Plot: `{png}`"] if png else []) + tail) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)
    if args.results is not None:
        if png is not None:
            figure = args.results.parent / "figures" / f"{args.name}.png"
            figure.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, figure)
            text = "\n".join(head + ["", f"![{title}](figures/{figure.name})"] + tail) + "\n"
        write_section(args.results, args.name, text)
    return text


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in
    ``path`` (added at the end when the markers are missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def machine() -> str:
    """The machine in a few words: CPU cores, GPU, torch."""
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU, {gpu}, torch {torch.__version__}"

