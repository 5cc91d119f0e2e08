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


#: panel title and y-axis label of each plotted metric
PANELS = {"success_rate": ("Success rate", "fraction of episodes won"),
          "reward_mean": ("Return per episode", "mean return")}


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """The ``(steps, values)`` of ``key`` in ``records``, finite values only."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_panels(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """``(key, title, y label)`` of each panel to draw: success rate, return (unless it
    equals the success rate at every step, as in FrozenLake; the success panel then
    says so), then every ``reward/<name>``."""
    panels = []
    steps_s, success = series(records, "success_rate")
    steps_r, returns = series(records, "reward_mean")
    same = steps_s == steps_r and success == returns
    if success:
        title, label = PANELS["success_rate"]
        panels.append(("success_rate", title + (" (= return per episode)" if same else ""), label))
    if returns and not same:
        panels.append(("reward_mean", *PANELS["reward_mean"]))
    parts = sorted({k for r in records for k in r if k.startswith("reward/")})
    panels += [(k, f"Reward {k.split('/', 1)[1]!r}", "mean per episode") for k in parts]
    return panels


def plot_metrics(records: list[dict[str, Any]], path: str | os.PathLike,
                 evals: dict[str, tuple[float, dict[str, Any]]] | None = None) -> Path:
    """Save a PNG with one panel per distinct quantity (:func:`plot_panels`) against the
    RL step: the raw points, their moving average (over a tenth of the run), and the
    evaluations in ``evals`` (``{label: (x, metrics)}``, e.g. after the warm-up and at the
    end) as large markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(records) or [("success_rate", *PANELS["success_rate"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    markers = ("s", "D", "^", "v")
    for ax, (key, title, label) in zip(axes[0], panels):
        xs, ys = series(records, key)
        if ys:
            window = max(1, round(len(ys) / 10))
            ax.plot(xs, ys, "o", markersize=3, alpha=0.35, color="tab:blue", label="per step")
            ax.plot(xs, moving_average(ys, window), color="tab:blue", label=f"moving average ({window} steps)")
        for (name, (x, metrics)), marker in zip((evals or {}).items(), markers):
            value = metrics.get(key) if metrics else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                ax.plot([x], [value], marker, markersize=9, color="tab:red" if name == "final" else "tab:orange",
                        label=f"evaluation {name}")
        if key == "success_rate":
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def progress_bar(total_steps: int, start: int):
    """A progress bar over a run's steps, at ``start``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="GRPO", unit="step", dynamic_ncols=True)
    if start:
        bar.update(start)
    return bar


def show_step(bar, record: dict[str, Any], silent: int) -> None:
    """A completed step on the progress bar: its reward, success rate and how many steps
    in a row had no learning signal."""
    postfix = {"reward": f"{record.get('reward_mean', float('nan')):.2f}",
               "success": f"{record.get('success_rate', float('nan')):.2f}"}
    if silent:
        postfix["no signal"] = f"{silent} step{'s' if silent > 1 else ''}"
    bar.set_postfix(postfix)
    bar.update(1)


#: step metrics that add up over ranks (the others are means, weighted by rows, or maxima)
SUMMED = ("num_rows", "signal_rows", "response_tokens", "rows_dropped", "episodes", "episodes_dropped", "groups_dropped", "env_errors",
          "env_timeouts", "env_nonfinite_rewards", "overlong_dropped", "overlong_truncated", "overlong_ended", "env_steps",
          "rollout_env_steps",
          "rollout_replayed_env_steps", "tree_nodes", "tree_expansions_short", "ar3po_reused", "ar3po_unsolved",
          "ar3po_buffer_size", "truncated_rows_masked", "remax_greedy_episodes", "remax_groups_without_baseline",
          "r3_groups_replayed", "r3_replayed_episodes", "r3_ranked_episodes", "r3_reflected_episodes", "r3_history_tasks")
MAXED = ("rollout_time", "update_time", "rollout_peak_inflight_tokens", "rollout_engine_steps", "rollout_decode_steps",
         "rollout_env_seconds", "ar3po_stages_run", "num_updates", "lr", "rollout_wait_time", "staleness_max")


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
