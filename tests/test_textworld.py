"""TextWorld: games generated once into the cache, played through the textworld API;
only admissible commands reach the game, the anchor is the game state, episodes are
deterministic, and the games' own walkthroughs win them."""

from __future__ import annotations

import json
import random
import sys

import pytest

pytest.importorskip("textworld", reason="the optional textworld package is not installed: pip install 'grpo_lab[textworld]'")

from grpo_lab.envs.textworld_games import (UNAVAILABLE, TextWorldEnv, clean_text, game_path,  # noqa: E402
                                           import_textworld)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("textworld_cache")


def walkthrough(env: TextWorldEnv) -> list[str]:
    return json.loads(env._game.with_suffix(".json").read_text())["metadata"]["walkthrough"]


@pytest.mark.parametrize("challenge", ["tw-simple", "tw-cooking"])
def test_a_game_is_generated_once_and_its_walkthrough_wins_it(cache, challenge):
    env = TextWorldEnv(challenge=challenge, num_games=1, cache_dir=str(cache))
    first = env.reset(0)
    path = game_path(challenge, env.settings, 0, cache)
    assert path.is_file() and path.with_suffix(".json").is_file() and env._game == path
    stamp = path.stat().st_mtime_ns
    total = 0.0
    for command in walkthrough(env):
        result = env.step(command)
        assert result.info["valid_action"], command
        total += result.reward
        if result.done:
            break
    assert result.done and result.info["won"] and not result.info["lost"]
    assert total == result.info["max_score"] == result.info["score"]  # the rewards are the points scored
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")
    again = TextWorldEnv(challenge=challenge, num_games=1, cache_dir=str(cache))
    assert again.reset(0) == first and path.stat().st_mtime_ns == stamp  # from the cache, not regenerated
    assert not list(cache.glob(".building-*"))


def test_only_admissible_commands_reach_the_game(cache):
    env = TextWorldEnv(num_games=1, cache_dir=str(cache))
    plain = TextWorldEnv(num_games=1, cache_dir=str(cache))
    start = env.reset(0)
    plain.reset(0)
    for junk in ["fly to the moon", "take note", "get apple", ""]:
        result = env.step(junk)
        assert result.info == {"won": False, "valid_action": False} and result.reward == 0.0
        assert result.observation.anchor == start.anchor and result.observation.text.startswith(UNAVAILABLE)
    rng = random.Random(1)
    for _ in range(15):  # the junk left no trace: the same commands give the same states as in a clean game
        command = rng.choice(plain.legal_actions())
        shouted = "  " + command.upper().replace(" ", "   ") + " "  # case and spacing do not matter
        assert env.step(shouted) == plain.step(command)
        if plain.done:
            break


def test_the_anchor_is_the_game_state_not_the_text(cache):
    env = TextWorldEnv(num_games=1, cache_dir=str(cache))
    start = env.reset(0)
    looked = env.step("look")
    assert looked.observation.anchor == start.anchor  # looking changes the text, not the state
    opener = next(c for c in env.legal_actions() if c.startswith("open "))
    opened = env.step(opener)
    assert opened.observation.anchor != start.anchor
    game, score, facts = opened.observation.anchor
    assert game == env._game.name and score == env.state["score"] and any(f.startswith("open(") for f in facts)


def test_episodes_are_a_function_of_the_seed_and_the_commands(cache):
    a, b = TextWorldEnv(num_games=2, cache_dir=str(cache)), TextWorldEnv(num_games=2, cache_dir=str(cache))
    for seed in (0, 1, 2):
        assert a.reset(seed) == b.reset(seed)
        rng = random.Random(seed)
        for _ in range(10):
            command = rng.choice(a.legal_actions())
            assert a.step(command) == b.step(command)
            if a.done:
                break
    assert a.reset(0).anchor[0] == a.reset(2).anchor[0] != a.reset(1).anchor[0]  # seed % num_games picks the game


def test_the_observation_lists_admissible_commands_without_banner_or_status_line(cache):
    env = TextWorldEnv(num_games=1, cache_dir=str(cache))
    text = env.reset(0).text
    assert text.splitlines()[-1] == "Admissible commands: " + ", ".join(env.legal_actions())
    assert "-= Bedroom =-" in text and "$$" not in text and "\n>" not in text
    assert "Admissible" not in TextWorldEnv(num_games=1, cache_dir=str(cache), show_admissible=False).reset(0).text


def test_clean_text_drops_the_banner_the_status_line_and_the_restart_question():
    raw = ("\n\n  ________  \n  \\_   _/ \n\nWelcome!\n\n-= Kitchen =-\nA kitchen.\n\n>   "
           "   -= Kitchen =-0/1")
    assert clean_text(raw) == "Welcome!\n\n-= Kitchen =-\nA kitchen."
    end = "You win.\n\n    *** The End ***\n\nWould you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?\n>  x"
    assert clean_text(end) == "You win.\n\n    *** The End ***"


def test_bad_options_and_a_missing_package_are_explained(monkeypatch):
    with pytest.raises(ValueError, match=r"\['recipes'\] are not options of tw-cooking"):
        TextWorldEnv(challenge="tw-cooking", settings={"recipes": 2})
    with pytest.raises(ValueError, match="tw-zork"):
        TextWorldEnv(challenge="tw-zork")
    monkeypatch.setitem(sys.modules, "textworld", None)
    with pytest.raises(ImportError, match=r"pip install 'grpo_lab\[textworld\]'"):
        import_textworld()


@pytest.mark.slow
def test_three_training_steps_on_textworld(tmp_path):
    from test_task_training import train

    train(tmp_path, ["env=textworld", f"env.kwargs.cache_dir={tmp_path / 'games'}", "env.kwargs.num_games=2",
                     "env.max_steps=4"])
