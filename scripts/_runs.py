"""Shared by the reproduction scripts: run a configuration through the trainer and
summarise its metrics."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

from grpo_lab.config import Config, LoggerConfig
from grpo_lab.training.trainer import Trainer


def run(config: Config, name: str) -> dict[str, Any]:
    """Train ``config`` in a fresh directory; the summary plus the per-step records."""
    config.logger = LoggerConfig(wandb="false", progress_bar=False, plot=False)
    out = Path(tempfile.mkdtemp(prefix=f"grpo_lab_{name}_"))
    summary = Trainer(config, output_dir=out).train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "records": records}


def mean_of(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return statistics.fmean(values) if values else float("nan")


def total_of(records: list[dict], key: str) -> float:
    return float(sum(r.get(key, 0) for r in records))


def run_all(configs: Callable[[int, int], dict[str, Config]], steps: int, seeds: list[int]) -> dict[str, list[dict]]:
    """``{name: [run per seed]}`` for the named configurations ``configs(steps, seed)``."""
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        for name, config in configs(steps, seed).items():
            rows.setdefault(name, []).append(run(config, name.split()[0].lower()))
    return rows


def eval_span(runs: list[dict]) -> str:
    """Mean evaluation success after the warm-up and at the end, as ``start -> end``."""
    start = statistics.fmean(r["summary"]["eval_after_warmup"]["success_rate"] for r in runs)
    end = statistics.fmean(r["summary"]["eval_final"]["success_rate"] for r in runs)
    return f"{start:.3f} -> {end:.3f}"


def parse_args(doc: str | None) -> argparse.Namespace:
    """``--steps`` and ``--seeds``, the options every reproduction script takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    return parser.parse_args()
