"""The paper-reproduction scripts: each runs end to end in --quick mode, writes its table
and plot (and its section of a results file), and prints commands that repeat its runs."""

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import _runs  # noqa: E402

SCRIPTS = {  # script: (rows its table must hold, whether it trains through python -m grpo_lab.train)
    "reproduce_gigpo": (["| sokoban | GRPO |", "| sokoban | GiGPO |", "| frozenlake (random maps) | GiGPO |"], True),
    "reproduce_fgrpo": (["| after warm-up", "| GRPO, 2 steps |", "| GRPO + focal (gamma=0.5), 2 steps |"], True),
    "reproduce_tree_grpo": (["| chains (GRPO, G=5) |", "| trees (Tree-GRPO, M=2 N=2 L=1) |"], True),
    "reproduce_prefix_grouper": (["| 4 |"], False),
    "reproduce_ar3po": (["| countdown | GRPO (G=8) |", "| frozenlake | AR3PO (2 stages x 4, reuse) |"], True),
    "reproduce_r3": (["| countdown | GRPO |", "| countdown, 2 numbers | GRPO + replay |",
                      "| countdown | R3 (replay, reflection, ranking) |"], True),
    "reproduce_toolrl": (["| GRPO, ToolRL reward |", "| GRPO, exact match |"], True),
    "reproduce_autorefine": (["| single-hop | search + refine, retrieval reward |",
                              "| multi-hop | plain search, answer reward |"], True),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_mode_writes_table_plot_and_results_section(script, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nbefore\n\n<!-- {script}:begin -->\nold numbers\n<!-- {script}:end -->\n\nafter\n")
    proc = subprocess.run([sys.executable, f"scripts/{script}.py", "--quick", "--out", str(tmp_path / "out"),
                           "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    rows, trains = SCRIPTS[script]
    for row in rows:
        assert row in report, f"{row!r} missing from\n{report}"
    assert (tmp_path / "out" / "plot.png").stat().st_size > 5000
    text = results.read_text()
    assert "old numbers" not in text and text.startswith("# Results\n\nbefore\n") and text.endswith("\n\nafter\n")
    assert report.split("\n\nPlot:")[0] in text and "![" in text
    assert (tmp_path / "figures" / f"{script}.png").exists()
    if trains:  # every run's command is printed as it starts and listed in the report
        started = [line[2:] for line in proc.stderr.splitlines() if line.startswith("$ python -m grpo_lab.train")]
        assert started and all(command in report for command in started)


@pytest.mark.slow
def test_a_printed_command_repeats_its_run_alone(tmp_path):
    """The first command the GiGPO script prints, run by itself, gives the same metrics."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "scripts/reproduce_gigpo.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = next(line[2:] for line in proc.stderr.splitlines() if line.startswith("$ python -m grpo_lab.train"))
    argv = shlex.split(first)
    original = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("trainer.output_dir=")))
    again = tmp_path / "again"
    argv = [a if not a.startswith("trainer.output_dir=") else f"trainer.output_dir={again}" for a in argv]
    subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, check=True, capture_output=True, timeout=900)
    timing = ("rollout_time", "update_time", "rollout_env_seconds")

    def metrics(path):
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert metrics(again) == metrics(ROOT / original if not original.is_absolute() else original)


def test_run_command_and_slug():
    run = _runs.Run("GRPO (G=8)", "frozenlake (random maps)", 3, ["env=frozenlake", "algo=grpo"])
    assert run.slug == "frozenlake_random_maps_-grpo_g_8_-seed3"
    assert "=" not in run.slug  # a Hydra override value may not hold '='
    assert run.command(Path("runs/x")) == ["python", "-m", "grpo_lab.train", "env=frozenlake", "algo=grpo",
                                           "trainer.seed=3", "trainer.output_dir=runs/x", *_runs.COMMON]


def test_spread_and_windows():
    assert _runs.spread([0.5]) == "0.500"
    assert _runs.spread([0.25, 0.75]) == "0.500 ± 0.354"
    assert _runs.spread([math.nan, math.nan]) == "n/a"
    assert _runs.mean_std([1.0, math.nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert _runs.window_mean([0, 1, 2, 3, 4, 5, 6], first=True, n=2) == 0.5
    assert _runs.window_mean([0, 1, 2, 3, 4, 5, 6], first=False, n=2) == 5.5
    assert _runs.window_mean([math.nan], first=False) != _runs.window_mean([math.nan], first=False)  # NaN


def test_write_section_replaces_between_markers_or_appends(tmp_path):
    path = tmp_path / "R.md"
    path.write_text("# R\n")
    _runs.write_section(path, "x", "first\n")
    assert path.read_text() == "# R\n\n<!-- x:begin -->\nfirst\n<!-- x:end -->\n"
    path.write_text(path.read_text() + "\nkept\n")
    _runs.write_section(path, "x", "second\n")
    assert path.read_text() == "# R\n\n<!-- x:begin -->\nsecond\n<!-- x:end -->\n\nkept\n"


def test_table_has_a_header_rule_per_column():
    text = _runs.table(["a", "b", "c"], [[1, 2, 3]])
    assert text.splitlines() == ["| a | b | c |", "|---|---:|---:|", "| 1 | 2 | 3 |"]


def test_a_second_invocation_refuses_in_one_line_instead_of_overwriting(tmp_path):
    """Run directories of an earlier invocation are in --out: without --reuse the script
    stops at once with one line naming both ways on (and leaves them as they were)."""
    import reproduce_ar3po

    out = tmp_path / "out"
    first = out / reproduce_ar3po.runs(2, [0])[0].slug
    first.mkdir(parents=True)
    (first / "metrics.jsonl").write_text("{}\n")
    proc = subprocess.run([sys.executable, "scripts/reproduce_ar3po.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {first} holds a run of an earlier invocation") and "--reuse" in lines[0] and "--out" in lines[0]
    assert (first / "metrics.jsonl").read_text() == "{}\n"
