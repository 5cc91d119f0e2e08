"""How actions sit in answers (``TextFormat``), lazily registered environments, the
``--list`` command, and the configs of every shipped environment."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import grpo_lab.envs as envs
from grpo_lab.envs import ACTION_FORMAT, TextFormat, get_env_factory, register_env, unregister_env
from grpo_lab.rollout.prompts import Turn, render_prompt

SHIPPED = ["alfworld", "countdown", "dataset", "frozenlake", "search_qa", "sokoban", "textworld", "webshop"]
CONFIGS = Path(__file__).resolve().parents[1] / "grpo_lab" / "configs" / "env"

plain = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1).filter(str.strip)


@given(plain)
def test_a_formatted_action_parses_back(action):
    assert ACTION_FORMAT.parse(ACTION_FORMAT.format(action)) == action.strip()
    answer = TextFormat(tags=("answer",))
    assert answer.parse("thinking first " + answer.format(action)) == action.strip()


def test_the_last_element_of_any_tag_is_the_action_and_keep_tags_keeps_it_whole():
    fmt = TextFormat(tags=("search", "answer"), keep_tags=True)
    assert fmt.parse("<search>a b</search> then <answer> Paris </answer>") == "<answer>Paris</answer>"
    assert fmt.parse("<search>x</answer>") is None  # the closing tag must match the opening one
    assert fmt.parse("<search>  </search>") is None
    assert fmt.stop == ("</search>", "</answer>")
    assert fmt.format("<search>q</search>") == "<search>q</search>"


def test_without_tags_the_whole_answer_is_the_action_and_generation_runs_to_the_end():
    fmt = TextFormat(tags=(), framed=False)
    assert fmt.parse("  The answer is 4.\n") == "The answer is 4." and fmt.parse(" \n") is None
    assert fmt.stop == ()
    assert render_prompt("Be brief.", [Turn("old", "x")], "What is 2+2?", 3, fmt) == "Be brief.\n\nWhat is 2+2?"
    assert render_prompt("", [], "What is 2+2?", 0, fmt) == "What is 2+2?"


def test_a_tag_that_is_not_a_name_is_refused():
    with pytest.raises(ValueError, match="'a b'"):
        TextFormat(tags=("a b",))


def test_an_environment_registered_by_path_is_imported_at_first_use():
    register_env("lazy_probe", "fault_envs:Corridor")
    try:
        assert envs.ENVS.registered("lazy_probe").target == "fault_envs:Corridor"
        from fault_envs import Corridor

        assert get_env_factory("lazy_probe") is Corridor
    finally:
        unregister_env("lazy_probe")
    register_env("broken_probe", "no_such_module_xyz:Env")
    try:
        with pytest.raises(ImportError, match="broken_probe.*no_such_module_xyz"):
            get_env_factory("broken_probe")
    finally:
        unregister_env("broken_probe")
    with pytest.raises(ValueError, match="module:attribute"):
        register_env("bad_path", "no_colon_here")


def test_list_shows_every_environment_with_its_options():
    out = subprocess.run([sys.executable, "-m", "grpo_lab.envs", "--list"], capture_output=True, text=True, check=True).stdout
    for name in SHIPPED:  # (this process may hold test environments the subprocess does not)
        assert f"\n{name}  (" in "\n" + out
    assert "num_numbers=3" in out and "is_slippery=False" in out and "top_k=3" in out
    one = subprocess.run([sys.executable, "-m", "grpo_lab.envs", "countdown"], capture_output=True, text=True, check=True).stdout
    assert one.startswith("countdown  (grpo_lab.envs.countdown.CountdownEnv)")
    bad = subprocess.run([sys.executable, "-m", "grpo_lab.envs", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "valid names" in bad.stderr


REQUIRED_OPTIONS = {"dataset": {"path": "unused.jsonl"}, "agent": {"entry": "unused:run", "tasks": "unused.jsonl"}}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_env_config_composes_and_spells_out_its_environment_s_defaults(path):
    from tests.test_config import load

    required = REQUIRED_OPTIONS.get(path.stem, {})  # options a task's file leaves to the command line (???)
    config = load(f"env={path.stem}", *(f"env.kwargs.{k}={v}" for k, v in required.items()))
    assert config.env.name == path.stem
    try:
        factory = get_env_factory(config.env.name)
    except ImportError as err:
        pytest.skip(f"{path.stem}: {err}")
    params = inspect.signature(factory).parameters
    assert set(config.env.kwargs) <= set(params), f"{path.name} names options the environment does not take"
    for key, value in config.env.kwargs.items():
        default = params[key].default
        if key in required or default is inspect.Parameter.empty:
            continue
        assert value == (list(default) if isinstance(default, tuple) else default), f"{path.name}: {key}"


@pytest.mark.parametrize("name, kwargs", [
    ("frozenlake", {}), ("frozenlake", {"is_slippery": True, "map_name": "8x8"}), ("sokoban", {}), ("countdown", {}),
    ("search_qa", {}), ("textworld", {"num_games": 1}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_demonstrated_action_survives_its_format_and_is_valid(name, kwargs, tmp_path_factory):
    """What the format warm-up shows (a legal action written in the environment's format)
    parses back to that action and is valid when played, for every shipped task."""
    if name == "textworld":
        pytest.importorskip("textworld", reason="the optional textworld package is not installed")
        kwargs = {**kwargs, "cache_dir": str(tmp_path_factory.mktemp("tw"))}
    env = envs.make_env(name, **kwargs)
    fmt = envs.text_format_of(env)
    for seed in range(3):
        env.reset(seed)
        for action in env.legal_actions()[:3]:
            assert fmt.parse("Let me think. " + fmt.format(action)) == action
        action = env.legal_actions()[0]
        assert env.step(fmt.parse(fmt.format(action))).info["valid_action"]
