"""The training curves: one panel per distinct quantity, readable titles, a moving average
and the evaluations marked."""

from __future__ import annotations

import pytest

from grpo_lab.training.metrics_log import moving_average, plot_metrics, plot_panels


def test_moving_average_by_hand():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 5) == [2.0, 3.0]


def test_frozenlake_return_equal_to_success_gets_one_panel_that_says_so():
    records = [{"step": s, "success_rate": s / 10, "reward_mean": s / 10} for s in range(5)]
    assert plot_panels(records) == [("success_rate", "Success rate (= return per episode)", "fraction of episodes won")]


def test_distinct_quantities_and_every_reward_function_get_their_panels():
    records = [{"step": s, "success_rate": 0.5, "reward_mean": 1.2, "reward/exact_match": 0.5, "reward/mod:fmt": 1.0}
               for s in range(3)]
    titles = [title for _, title, _ in plot_panels(records)]
    assert titles == ["Success rate", "Return per episode", "Reward 'exact_match'", "Reward 'mod:fmt'"]


@pytest.mark.parametrize("steps", [1, 50])
def test_the_plot_is_written_with_evaluations(tmp_path, steps):
    records = [{"step": s, "success_rate": s / steps, "reward_mean": 2 * s / steps} for s in range(steps)]
    path = plot_metrics(records, tmp_path / "curves.png",
                        {"after warm-up": (-0.5, {"success_rate": 0.1}), "final": (steps - 0.5, {"success_rate": 0.9})})
    assert path.stat().st_size > 5000
