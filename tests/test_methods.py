"""The table of methods (README and ``--list methods``): every registered estimator,
modifier, policy loss, KL estimator, aggregation, ratio level and sampler has a row; every
row's config line composes into a valid config that selects it; the README holds the
table as :func:`grpo_lab.methods.markdown_table` renders it."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpo_lab.__main__ import main
from grpo_lab.advantages.registry import ESTIMATORS, MODIFIERS
from grpo_lab.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, RATIO_LEVELS_OF_ROWS
from grpo_lab.methods import METHODS, markdown_table
from grpo_lab.rollout.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("registry, kind", [(ESTIMATORS, "estimator"), (MODIFIERS, "modifier"),
                                            (POLICY_LOSSES, "policy loss"), (KL_ESTIMATORS, "KL estimator"),
                                            (AGGREGATIONS, "aggregation"), (RATIO_LEVELS_OF_ROWS, "correction")])
def test_every_registered_method_has_a_row(registry, kind):
    listed = {m.name for m in METHODS if m.kind == kind}
    assert set(registry.names()) <= listed, sorted(set(registry.names()) - listed)


def test_every_sampler_but_the_plain_one_has_a_row():
    listed = {m.name for m in METHODS if m.kind == "sampler"}
    assert set(SAMPLERS.names()) - {"chain"} <= listed


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.kind}:{m.name}")
def test_each_config_line_composes_and_selects_its_method(method):
    from grpo_lab.train import compose_config

    config = compose_config(method.config.split())
    selected = {"estimator": config.algo.estimator, "policy loss": config.algo.policy_loss,
                "sampler": config.rollout.sampler, "aggregation": config.algo.loss_agg,
                "KL estimator": config.algo.kl_estimator}
    if method.kind in selected and method.name in (ESTIMATORS.names() + POLICY_LOSSES.names() + SAMPLERS.names()
                                                   + AGGREGATIONS.names() + KL_ESTIMATORS.names()):
        assert selected[method.kind] == method.name


def test_the_readme_holds_the_table_and_list_prints_it(capsys):
    assert markdown_table() in (ROOT / "README.md").read_text()
    assert main(["--list", "methods"]) == 0
    out = capsys.readouterr().out
    assert all(m.config in out for m in METHODS)
