"""ALFWorld adapter: the data check and its download command, the game list filtered as
ALFWorld filters it, and the text protocol, admissible commands and anchor, checked on
a recorded episode of a real ALFWorld game (the data itself is not downloadable here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("alfworld", reason="the optional alfworld package is not installed: pip install 'grpo_lab[alfworld]'")

from grpo_lab.envs.alfworld import NOTHING, WIN_REWARD, ALFWorldEnv, game_files, render, task_of  # noqa: E402

EPISODE = json.loads((Path(__file__).parent / "data" / "alfworld_episode.json").read_text())


class RecordedGame:
    """A TextWorld gym environment that replays the recorded episode; its facts are the
    state-changing commands so far (looking changes nothing)."""

    def __init__(self) -> None:
        self.steps = {s["action"]: s for s in EPISODE["steps"]}
        self.sent: list[str] = []

    def reset(self):
        self.sent, self.facts = [], ["at(agent, middle of room)"]
        return EPISODE["reset"]["obs"], self._infos(EPISODE["reset"]["admissible_commands"], False)

    def step(self, command):
        self.sent.append(command)
        s = self.steps[command]
        if command not in ("look", "inventory"):
            self.facts = self.facts + [f"done({command})"]
        return s["obs"], s["score"], s["done"], self._infos(s["admissible_commands"], s["won"])

    def _infos(self, admissible, won):
        return {"admissible_commands": list(admissible), "won": won, "facts": list(self.facts),
                "extra.gamefile": "game.tw-pddl"}

    def close(self):
        pass


def fake_data(root: Path, games: dict[str, dict]) -> None:
    """An ALFWorld data tree: ``{trial path: {"task_type", "solvable", "tw"}}``."""
    for trial, spec in games.items():
        d = root / "json_2.1.1" / trial
        d.mkdir(parents=True)
        (d / "traj_data.json").write_text(json.dumps({"task_type": spec["task_type"]}))
        if spec.get("tw", True):
            (d / "game.tw-pddl").write_text(json.dumps({"solvable": spec.get("solvable", True)}))


@pytest.fixture()
def data(tmp_path):
    fake_data(tmp_path, {
        "train/look_at_obj_in_light-CD-None-DeskLamp-308/trial_1": {"task_type": "look_at_obj_in_light"},
        "train/pick_and_place_simple-Mug-None-Desk-308/trial_2": {"task_type": "pick_and_place_simple"},
        "train/pick_and_place_simple-Mug-None-Desk-308/trial_3": {"task_type": "pick_and_place_simple", "solvable": False},
        "train/pick_and_place_simple-Apple_Sliced-None-Desk-1/trial_4": {"task_type": "pick_and_place_simple"},
        "train/pick_and_place_simple-Mug-None-Desk-9/trial_5": {"task_type": "pick_and_place_simple", "tw": False},
    })
    game_files.cache_clear()
    return tmp_path


@pytest.fixture()
def env(data, monkeypatch):
    monkeypatch.setattr(ALFWorldEnv, "_open", lambda self, game: RecordedGame())
    return ALFWorldEnv(data_dir=str(data), task_types=[2])


def test_missing_data_names_the_directory_and_the_download_command(tmp_path, monkeypatch):
    game_files.cache_clear()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/json_2.1.1/valid_seen does not exist.*alfworld-download"):
        ALFWorldEnv(split="valid_seen", data_dir=str(tmp_path))
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="ALFWORLD_DATA=.*elsewhere alfworld-download"):
        ALFWorldEnv()


def test_games_are_sorted_and_filtered_as_alfworld_filters_them(data):
    games = game_files(data, "train", (1, 2, 3, 4, 5, 6))
    assert [g.parent.name for g in games] == ["trial_1", "trial_2"]  # no unsolvable, Sliced or game-less trial
    assert [g.parent.name for g in game_files(data, "train", (1,))] == ["trial_2"]
    game_files.cache_clear()
    with pytest.raises(FileNotFoundError, match=r"no solvable game.tw-pddl of task types \[6\]"):
        game_files(data, "train", (6,))


def test_the_first_observation_carries_the_task_and_the_admissible_commands(env):
    obs = env.reset(0)
    assert env.task == "examine the cd with the desklamp." == task_of(EPISODE["reset"]["obs"])
    lines = obs.text.splitlines()
    assert "Welcome" not in obs.text and lines[0].startswith("You are in the middle of a room.")
    assert lines[-1] == "Admissible commands: " + ", ".join(c for c in EPISODE["reset"]["admissible_commands"] if c != "help")
    assert env.legal_actions() == [c for c in EPISODE["reset"]["admissible_commands"] if c != "help"]


def test_a_command_that_is_not_admissible_never_reaches_the_game(env):
    start = env.reset(0)
    for junk in ["dummy", "take cd 1 from desk 1", "fly"]:  # the take is admissible only at the desk
        result = env.step(junk)
        assert result.info == {"won": False, "valid_action": False} and result.reward == 0.0 and not result.done
        assert result.observation.text.startswith(NOTHING) and result.observation.anchor == start.anchor
    assert env._env.sent == []
    assert env.step("  GO TO   Desk 1 ").info["valid_action"]  # case and spacing aside
    assert env._env.sent == ["go to desk 1"]


def test_the_anchor_is_the_game_state_and_a_win_pays_ten(env):
    start = env.reset(0)
    at_desk = env.step("go to desk 1").observation
    assert at_desk.anchor != start.anchor and at_desk.anchor[0].endswith("trial_1/game.tw-pddl")
    assert env.step("look").observation.anchor == at_desk.anchor  # looking changes the text, not the state
    env.step("take cd 1 from desk 1")
    result = env.step("use desklamp 1")
    assert result.reward == WIN_REWARD and result.done and result.info == {"won": True, "valid_action": True}
    assert "Admissible" not in result.observation.text
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")


def test_render_leaves_out_help():
    assert render("You arrive at desk 1.", ["help", "look"]) == "You arrive at desk 1.\nAdmissible commands: look"


def test_bad_options_name_their_value(data):
    with pytest.raises(ValueError, match="split must be one of .*'test'"):
        ALFWorldEnv(split="test", data_dir=str(data))
    with pytest.raises(ValueError, match=r"task_types .*\[7\]"):
        ALFWorldEnv(task_types=[7], data_dir=str(data))


REAL_DATA = Path(os.environ.get("ALFWORLD_DATA", "~/.cache/alfworld")).expanduser() / "json_2.1.1" / "valid_seen"


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"ALFWorld data not downloaded ({REAL_DATA} missing): run alfworld-download")
def test_a_real_game_plays_with_admissible_commands():
    env = ALFWorldEnv(split="valid_seen")
    obs = env.reset(0)
    assert env.task and env.legal_actions()
    again = ALFWorldEnv(split="valid_seen")
    assert again.reset(0) == obs
    command = env.legal_actions()[0]
    assert env.step(command) == again.step(command)
