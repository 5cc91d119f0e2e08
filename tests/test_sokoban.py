"""Sokoban: the rules of pushing, verl-agent's rewards, levels that are always solvable,
determinism in the seed, exact anchors, and a short training run."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_lab.envs import make_env
from grpo_lab.envs.sokoban import SokobanEnv, generate_level, solve


def level(rows: list[str]) -> SokobanEnv:
    """A hand-made level: ``#`` wall, ``_`` floor, ``O`` target, ``X`` box, ``√`` box on a
    target, ``P`` player, ``S`` player on a target."""
    env = SokobanEnv()
    env.floor = frozenset((r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch != "#")
    env.targets = frozenset((r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch in "O√S")
    env.boxes = {(r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch in "X√"}
    env.player = next((r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch in "PS")
    env.height, env.width = len(rows), len(rows[0])
    env.layout = tuple("".join("O" if (r, c) in env.targets else "_" if (r, c) in env.floor else "#"
                               for c in range(env.width)) for r in range(env.height))
    return env


def test_a_push_moves_the_box_and_pays_verl_agents_rewards():
    env = level(["######",
                 "#P_XO#",
                 "######"])
    first = env.step("right")
    assert first.reward == pytest.approx(-0.1) and env.player == (1, 2) and not first.done
    last = env.step("right")  # the box reaches the only target: -0.1 + 1 + 10
    assert last.reward == pytest.approx(10.9) and last.done and last.info == {"won": True, "valid_action": True}
    assert env.render() == "######\n#__P√#\n######"


def test_pushing_a_box_off_a_target_costs_one():
    env = level(["#######",
                 "#P√_XO#",
                 "#######"])
    result = env.step("right")
    assert result.reward == pytest.approx(-1.1) and env.boxes == {(1, 3), (1, 4)}


@pytest.mark.parametrize("rows, move", [
    (["######", "#PX#O#", "######"], "right"),  # a box against a wall does not move
    (["#######", "#PXX_O#", "#######"], "right"),  # a box into a box does not move
    (["######", "#P_XO#", "######"], "up"),  # a wall
])
def test_blocked_moves_change_nothing_but_cost_the_step(rows, move):
    env = level(rows)
    before = env._observe().anchor
    result = env.step(move)
    assert result.observation.anchor == before and result.reward == pytest.approx(-0.1)
    assert result.info["valid_action"]


def test_there_is_no_pulling():
    env = level(["######", "#_XP_#", "#O####", "######"])
    env.step("right")
    assert env.boxes == {(1, 2)} and env.player == (1, 4)


def test_an_unknown_word_is_invalid_and_free():
    env = level(["#####", "#PXO#", "#####"])
    result = env.step("jump")
    assert result.info == {"won": False, "valid_action": False} and result.reward == 0.0 and env.player == (1, 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), boxes=st.integers(1, 2), size=st.integers(5, 7))
def test_every_generated_level_is_solvable_and_not_solved(seed, boxes, size):
    """Property: reverse play from the solved state gives a level a breadth-first solver
    solves, with at least one box off its target."""
    floor, targets, placed, player = generate_level(size, size, boxes, random.Random(seed))
    assert len(placed) == len(targets) == boxes and placed != targets
    assert player in floor and player not in placed and placed <= floor
    assert solve(floor, targets, placed, player) is not None


def test_a_seed_gives_one_level_and_the_anchor_is_the_exact_state():
    a, b = make_env("sokoban", num_boxes=2, height=7, width=7), make_env("sokoban", num_boxes=2, height=7, width=7)
    oa, ob = a.reset(11), b.reset(11)
    assert oa == ob and a.reset(12).anchor != ob.anchor
    a.reset(11)
    for move in ("up", "left", "down", "right"):
        ra, rb = a.step(move), b.step(move)
        assert ra.observation == rb.observation and ra.reward == rb.reward
    layout, player, boxes = ra.observation.anchor
    assert player == a.player and list(boxes) == sorted(a.boxes) and "P" not in "".join(layout)


def test_bad_sizes_are_refused_with_their_values():
    with pytest.raises(ValueError, match="4x6"):
        SokobanEnv(height=4, width=6)
    with pytest.raises(ValueError, match="num_boxes=9"):
        SokobanEnv(num_boxes=9)


@pytest.mark.slow
def test_three_training_steps_on_sokoban(tmp_path):
    from hydra import compose, initialize_config_module

    from grpo_lab.train import build_config
    from grpo_lab.trainer import Trainer

    overrides = ["env=sokoban", "algo.group_size=4", "trainer.total_steps=3", "trainer.tasks_per_step=2",
                 "trainer.eval_episodes=2", "trainer.warmup.steps=5", "trainer.warmup.episodes=10",
                 "env.max_steps=4", "model.tiny_hidden_size=64", "model.tiny_num_heads=1", "model.tiny_num_kv_heads=1",
                 "logger.wandb=false", "logger.progress_bar=false", "logger.plot=false", "trainer.save_final=false"]
    with initialize_config_module(config_module="grpo_lab.configs", version_base="1.3"):
        config = build_config(compose(config_name="config", overrides=overrides))
    summary = Trainer(config, output_dir=tmp_path).train()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "eval_final" in summary
