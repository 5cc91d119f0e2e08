"""The one Registry type: duplicate names raise, unknown names list the valid ones, import
paths load at first use, plugins come through entry points, and ``python -m grpo_lab
--list`` prints every registry of named choices."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from grpo_lab.registry import REGISTRIES, DuplicateNameError, Registry, UnknownNameError


def fresh(name: str) -> Registry:
    REGISTRIES.pop(name, None)
    return Registry(name, f"test.{name}", "test entry")


def test_a_name_resolves_to_its_object_and_a_duplicate_or_unknown_name_raises():
    reg = fresh("test_registry_a")

    @reg.register("double")
    def double(x, *, factor=2):
        """Doubles."""
        return factor * x

    assert reg.get("double") is double and reg["double"](3) == 6
    assert reg.options("double") == ("factor=2",) and reg.descriptions() == {"double": "Doubles."}
    with pytest.raises(DuplicateNameError, match="'double' is already registered"):
        reg.register("double", len)
    with pytest.raises(UnknownNameError, match=r"unknown test entry 'triple'; valid names: \['double'\]"):
        reg.get("triple")
    assert isinstance(UnknownNameError("x"), KeyError) and isinstance(UnknownNameError("x"), ValueError)
    with pytest.raises(DuplicateNameError):
        Registry("test_registry_a", "k", "kind")


def test_an_import_path_loads_at_first_use_and_plugins_come_through_entry_points(monkeypatch):
    reg = fresh("test_registry_b")
    reg.register("dumps", "json:dumps")
    assert not reg.registered("dumps").loaded
    import json

    assert reg.get("dumps") is json.dumps and reg.registered("dumps").loaded
    ep = importlib.metadata.EntryPoint(name="loads", value="json:loads", group="grpo_lab.test_registry_b")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [ep] if group == "grpo_lab.test_registry_b" else [])
    reg.refresh_plugins()
    assert reg.names() == ["dumps", "loads"] and reg.get("loads") is json.loads


def test_every_named_choice_of_a_run_has_a_registry_and_the_list_command_prints_them():
    out = subprocess.run([sys.executable, "-m", "grpo_lab", "--list"], capture_output=True, text=True, check=True).stdout
    for registry, key, entry in (("estimators", "algo.estimator", "gigpo"), ("policy_losses", "algo.policy_loss", "reinforce"),
                                 ("kl_estimators", "algo.kl_estimator", "k3"), ("packings", "trainer.packing", "trie"),
                                 ("episode_formats", "rollout.episode_format", "conversation"),
                                 ("backends", "rollout.backend", "vllm"), ("samplers", "rollout.sampler", "adaptive"),
                                 ("envs", "env.name", "frozenlake"), ("rewards", "env.kwargs.rewards", "math")):
        assert f"{registry} ({key}):" in out and f"\n  {entry}  " in out
    one = subprocess.run([sys.executable, "-m", "grpo_lab", "--list", "packings"], capture_output=True, text=True,
                         check=True).stdout
    assert one.startswith("packings (trainer.packing):") and "estimators" not in one
    bad = subprocess.run([sys.executable, "-m", "grpo_lab", "--list", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown registry 'nope'; valid names:" in bad.stderr


def test_the_advantage_names_are_resolved_once_into_a_pipeline_with_the_estimators_penalty_placement():
    """``AlgoConfig.advantages()`` looks every name up at the door: the estimator and
    modifier objects, and the penalty placement an estimator defaults to (Tree-GRPO's
    penalty goes into the episode's rewards, the others' onto each row)."""
    from grpo_lab.config import AlgoConfig, ConfigError

    tree = AlgoConfig(estimator="tree_grpo").advantages()
    assert (tree.estimator.name, tree.penalty_placement) == ("tree_grpo", "episode")
    focal = AlgoConfig(estimator="grpo", modifiers=["focal"], modifier_params={"focal": {"gamma": 2.0}}).advantages()
    assert focal.penalty_placement == "row" and [(m.name, dict(p)) for m, p in focal.modifiers] == [("focal", {"gamma": 2.0})]
    assert AlgoConfig(estimator="tree_grpo", penalty_placement="row").advantages().penalty_placement == "row"
    with pytest.raises(ConfigError, match=r"unknown advantage modifier 'nope'; valid names: \['focal'"):
        AlgoConfig(modifiers=["nope"]).advantages()
