"""pass@k: the unbiased estimator against hand-worked values and exhaustive enumeration,
and the trainer's evaluation with several samples per task."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from grpo_lab.training.pass_at_k import pass_at_k, pass_at_k_ks, success_counts


def test_hand_worked_values():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@4 = 1
    n, c = torch.tensor([4, 4, 4]), torch.tensor([1, 0, 4])
    assert pass_at_k(n, c, 1).tolist() == pytest.approx([0.25, 0.0, 1.0])
    assert pass_at_k(n, c, 2).tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert pass_at_k(n, c, 4).tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_large_n_is_finite_and_matches_the_product_form():
    # n=1024, c=3, k=64: 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    exact = 1 - math.prod(1 - 64 / i for i in range(1022, 1025))
    assert pass_at_k(torch.tensor([1024]), torch.tensor([3]), 64).item() == pytest.approx(exact, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_equals_the_mean_over_every_subset_of_k_samples(case):
    n, c, k = case
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert pass_at_k(torch.tensor([n]), torch.tensor([c]), k).item() == pytest.approx(expected, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_rises_with_k(case):
    n, c = case
    assert pass_at_k(torch.tensor([n]), torch.tensor([0]), n).item() == 0.0  # exactly, never a rounding error
    values = [pass_at_k(torch.tensor([n]), torch.tensor([c]), k).item() for k in range(1, n + 1)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(c / n)


def test_refuses_too_few_samples_and_bad_k():
    with pytest.raises(ValueError, match="at least 8 episodes"):
        pass_at_k(torch.tensor([4]), torch.tensor([1]), 8)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(torch.tensor([4]), torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="correct"):
        pass_at_k(torch.tensor([4]), torch.tensor([5]), 1)


def test_reported_ks_and_counts():
    assert pass_at_k_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert pass_at_k_ks(12) == [1, 2, 4, 8, 12]
    assert pass_at_k_ks(1) == [1]
    samples, correct = success_counts(torch.tensor([7, 3, 7, 7, 3]), torch.tensor([True, False, False, True, False]))
    assert samples.tolist() == [2, 3] and correct.tolist() == [0, 2]


@pytest.mark.slow
def test_evaluation_reports_pass_at_k_over_the_real_rollout(tmp_path):
    from test_train_e2e import small_config

    from grpo_lab.trainer import Trainer

    config = small_config(eval_samples=4)
    config.trainer.eval_episodes = 16
    config.env.max_steps = 10  # a policy of random legal moves wins about 14% of 10-step episodes
    trainer = Trainer(config, output_dir=tmp_path)
    trainer.warmup()  # legal moves, so that some episodes succeed
    out = trainer.evaluate()
    assert {"pass@1", "pass@2", "pass@4", "episode_length"} <= set(out)
    assert out["pass@1"] == pytest.approx(out["success_rate"])  # every task kept its 4 episodes
    assert 0.0 < out["pass@1"] <= out["pass@2"] <= out["pass@4"] <= 1.0
    config.trainer.eval_samples = 1
    single = Trainer(config, output_dir=tmp_path / "one").evaluate()
    assert not any(key.startswith("pass@") for key in single)
