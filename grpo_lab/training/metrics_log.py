"""Metrics: JSON lines on disk, wandb in offline mode when installed, a PNG plot, and
the reduction of a step's metrics over data-parallel ranks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .distributed import DistContext, gather_objects


def _wandb_module(mode: str):
    if mode == "false":
        return None
    try:
        import wandb  # type: ignore
    except ImportError:
        if mode == "true":
            raise ImportError("logger.wandb=true but wandb is not installed: pip install 'grpo_lab[wandb]'") from None
        return None
    return wandb


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` in ``output_dir``."""

    def __init__(self, output_dir: str | os.PathLike, wandb_mode: str = "auto", project: str = "grpo_lab",
                 config: dict[str, Any] | None = None) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self.history: list[dict[str, Any]] = []
        self._wandb_run = None
        wandb = _wandb_module(str(wandb_mode).lower())
        if wandb is not None:
            self._wandb_run = wandb.init(project=project, dir=str(self.dir), mode="offline", config=config or {})

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v) for k, v in record.items()}
        self.history.append(clean)
        self._file.write(json.dumps(clean, allow_nan=True) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(clean, step=int(clean.get("step", len(self.history))))

    def close(self) -> None:
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def plot_metrics(records: list[dict[str, Any]], path: str | os.PathLike,
                 keys: tuple[str, ...] = ("reward_mean", "success_rate")) -> Path:
    """Save a PNG with one panel per key, plotted against ``step``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and not math.isnan(r[key])]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_xlabel("RL step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: step metrics that add up over ranks (the others are means, weighted by rows, or maxima)
SUMMED = ("num_rows", "response_tokens", "rows_dropped", "episodes", "episodes_dropped", "groups_dropped", "env_errors",
          "env_timeouts", "env_nonfinite_rewards", "overlong_dropped", "overlong_truncated", "overlong_ended", "env_steps",
          "rollout_env_steps",
          "rollout_replayed_env_steps", "tree_nodes", "tree_expansions_short", "ar3po_reused", "ar3po_unsolved",
          "ar3po_buffer_size")
MAXED = ("rollout_time", "update_time", "rollout_peak_inflight_tokens", "rollout_engine_steps", "rollout_decode_steps",
         "rollout_env_seconds", "ar3po_stages_run", "num_updates", "lr")


def reduce_record(dist: DistContext, record: dict[str, Any], rows: int) -> dict[str, Any]:
    """One step's metrics over all ranks: counts summed (:data:`SUMMED`), times and peaks
    maximised (:data:`MAXED`), every other number a mean weighted by each rank's rows."""
    if not dist.enabled:
        return record
    numeric = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    everyone = gather_objects(dist, (numeric, rows))
    total_rows = sum(r for _, r in everyone)
    out: dict[str, Any] = {"step": record["step"]} if "step" in record else {}
    for key in sorted(set().union(*(m.keys() for m, _ in everyone))):
        values = [(m[key], r) for m, r in everyone if key in m]
        if key in SUMMED:
            out[key] = sum(v for v, _ in values)
        elif key in MAXED:
            out[key] = max(v for v, _ in values)
        else:
            weight = sum(r for _, r in values)
            out[key] = (sum(v * r for v, r in values) / weight if weight > 0
                        else sum(v for v, _ in values) / len(values))
    out["world_size"] = dist.world_size
    if total_rows == 0:
        out["num_rows"] = 0
    return out
