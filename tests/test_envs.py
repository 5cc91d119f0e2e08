"""FrozenLake rules: moves, walls, holes, goal, determinism and anchors; gymnasium's
maps, map generator and slipping."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_lab.envs import Env, FrozenLakeEnv, make_env
from grpo_lab.envs.frozenlake import generate_map, _reachable

GRID = ("....", ".H..", "...H", "H..G")


def fresh(pos):
    env = FrozenLakeEnv(size=4, num_holes=3)
    env.set_state(GRID, pos)
    return env


def test_follows_env_protocol():
    assert isinstance(FrozenLakeEnv(), Env)


def test_legal_actions_exclude_moves_off_the_grid():
    assert fresh((0, 0)).legal_actions() == ["right", "down"]
    assert sorted(fresh((1, 2)).legal_actions()) == ["down", "left", "right", "up"]
    assert fresh((3, 1)).legal_actions() == ["left", "right", "up"]


def test_move_updates_position_and_anchor():
    env = fresh((0, 0))
    result = env.step("right")
    assert env.pos == (0, 1)
    assert result.reward == 0.0 and not result.done
    assert result.info == {"won": False, "valid_action": True}
    assert result.observation.anchor == (GRID, 0, 1)
    assert "row 1, column 2" in result.observation.text


def test_illegal_and_unknown_actions_leave_state_unchanged():
    env = fresh((0, 0))
    for action in ("up", "left", "jump", ""):
        result = env.step(action)
        assert result.info["valid_action"] is False
        assert env.pos == (0, 0) and not result.done and result.reward == 0.0


def test_actions_are_case_and_space_insensitive():
    env = fresh((0, 0))
    assert env.step("  Down ").info["valid_action"]
    assert env.pos == (1, 0)


def test_hole_ends_episode_without_reward():
    env = fresh((0, 1))
    result = env.step("down")
    assert result.done and result.reward == 0.0 and result.info["won"] is False
    with pytest.raises(RuntimeError, match="reset"):
        env.step("up")


def test_goal_ends_episode_with_reward_one():
    env = fresh((3, 2))
    result = env.step("right")
    assert result.done and result.reward == 1.0 and result.info["won"] is True


def test_rendering_marks_agent_holes_and_goal():
    env = fresh((0, 2))
    assert env.render().splitlines() == [". . P .", ". H . .", ". . . H", "H . . G"]


def test_reset_is_deterministic_in_seed_and_fixed_map_is_shared():
    a, b = FrozenLakeEnv(map_mode="fixed", map_seed=3), FrozenLakeEnv(map_mode="fixed", map_seed=3)
    assert a.reset(11) == b.reset(11)
    starts = {FrozenLakeEnv(map_mode="fixed", map_seed=3).reset(s).anchor for s in range(50)}
    assert len({anchor[0] for anchor in starts}) == 1  # one map
    assert len(starts) > 3  # several start cells


def test_random_maps_differ_across_seeds_and_are_solvable():
    maps = {FrozenLakeEnv(map_mode="random").reset(s).anchor[0] for s in range(30)}
    assert len(maps) > 10
    for grid in maps:
        ice = [(r, c) for r in range(4) for c in range(4) if grid[r][c] == "."]
        assert all(_reachable(list(grid), cell, (3, 3)) for cell in ice)


def test_generated_map_has_requested_holes():
    import random

    grid = generate_map(5, 6, random.Random(0))
    assert sum(row.count("H") for row in grid) == 6 and grid[4][4] == "G"


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 1}, "size"), ({"num_holes": 20}, "num_holes"), ({"map_mode": "maze"}, "map_mode"),
    ({"map_name": "9x9"}, "map_name must be null or one of .*'9x9'"), ({"generator": "maze"}, "generator.*'maze'"),
    ({"map_name": "4x4", "map_mode": "random"}, "needs map_mode='fixed'"), ({"frozen_prob": 0}, "frozen_prob.*got 0"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrozenLakeEnv(**kwargs)


def test_make_env_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="frozenlake"):
        make_env("sokobann")


def test_named_maps_are_gymnasium_s_and_start_at_s():
    from gymnasium.envs.toy_text.frozen_lake import MAPS

    for name in ("4x4", "8x8"):
        env = FrozenLakeEnv(map_name=name)
        obs = env.reset(123)
        assert env.pos == (0, 0) and env.grid == tuple(row.replace("S", ".").replace("F", ".") for row in MAPS[name])
        assert obs.anchor == (env.grid, 0, 0)


def test_the_gymnasium_generator_gives_generate_random_map_s_maps():
    from gymnasium.envs.toy_text.frozen_lake import generate_random_map

    env = FrozenLakeEnv(size=6, generator="gymnasium", frozen_prob=0.7, map_mode="random")
    env.reset(42)
    expected = generate_random_map(size=6, p=0.7, seed=42)
    assert env.grid == tuple(row.replace("S", ".").replace("F", ".") for row in expected) and env.pos == (0, 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.sampled_from(["left", "right", "up", "down"]), max_size=12))
def test_without_slipping_a_legal_move_goes_where_it_says(seed, moves):
    env = FrozenLakeEnv(map_mode="random", size=5, num_holes=4)
    env.reset(seed)
    for move in moves:
        if env.done:
            break
        (r, c), legal = env.pos, move in env.legal_actions()
        result = env.step(move)
        dr, dc = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[move]
        assert env.pos == ((r + dr, c + dc) if legal else (r, c)) and result.info["valid_action"] == legal
        cell = env.grid[env.pos[0]][env.pos[1]]
        assert result.done == (cell in "GH") and result.reward == float(cell == "G") == float(result.info["won"])


def test_slipping_goes_sideways_sometimes_never_backwards_and_replays_exactly():
    seen = set()
    for seed in range(60):
        env = FrozenLakeEnv(size=4, num_holes=0, is_slippery=True)
        env.set_state(("....", "....", "....", "...G"), (1, 1), seed=seed)
        env.step("right")
        seen.add(env.pos)
        again = FrozenLakeEnv(size=4, num_holes=0, is_slippery=True)
        again.set_state(("....", "....", "....", "...G"), (1, 1), seed=seed)
        again.step("right")
        assert again.pos == env.pos  # the slip is a function of the seed
    assert seen == {(1, 2), (0, 1), (2, 1)}  # intended, or either perpendicular; never left


def test_a_slippery_episode_is_a_function_of_its_seed_and_actions():
    rng = random.Random(0)
    for seed in range(10):
        a, b = FrozenLakeEnv(is_slippery=True, map_mode="random"), FrozenLakeEnv(is_slippery=True, map_mode="random")
        assert a.reset(seed) == b.reset(seed)
        while not a.done:
            move = rng.choice(a.legal_actions())
            assert a.step(move) == b.step(move)
