"""ALFWorld (text), the household tasks of the GiGPO paper, through the ``alfworld`` package.

Episode ``seed`` plays game ``seed % N`` of the sorted games of a split
(``train``: 3,553 games, ``valid_seen``: 140, ``valid_unseen``: 134), filtered as
ALFWorld's own ``AlfredTWEnv`` filters them (task types, no ``movable``/``Sliced``
variants, solvable games only). Each game is a TextWorld PDDL game read with ALFWorld's
name demangler, as ``AlfredTWEnv.init_env`` builds it, but one game per episode instead
of ALFWorld's shuffled cycle, so that a seed names a game.

The observation is the game's text (the welcome banner dropped; the first one ends with
"Your task is to: ..."), followed by the admissible commands (``help`` left out). An
action is valid when it is an admissible command (case and spacing aside); any other
gets ALFWorld's own answer, "Nothing happens.", without reaching the game. Reward:
verl-agent's, ``10 * won`` (the game's score is 1 on success). The anchor is the game
state: ``(game file, sorted PDDL facts)``.

Needs ``pip install 'grpo_lab[alfworld]'`` and ALFWorld's data, which
``alfworld-download`` fetches into ``$ALFWORLD_DATA`` (default ``~/.cache/alfworld``);
the environment names what is missing and the command that fetches it.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .base import Observation, StepResult

SPLITS = ("train", "valid_seen", "valid_unseen")
TASK_TYPES = {1: "pick_and_place_simple", 2: "look_at_obj_in_light", 3: "pick_clean_then_place_in_recep",
              4: "pick_heat_then_place_in_recep", 5: "pick_cool_then_place_in_recep", 6: "pick_two_obj_and_place"}
BANNER = "-= Welcome to TextWorld, ALFRED! =-"
TASK_PREFIX = "Your task is to: "
NOTHING = "Nothing happens."
WIN_REWARD = 10.0
INSTRUCTION = (
    "ALFWorld: you are in a house; do the task it gives you. Answer with one of the admissible commands in "
    "<action></action>, for example <action>go to desk 1</action>."
)


def data_root(data_dir: str | None) -> Path:
    """``data_dir``, else ``$ALFWORLD_DATA``, else ``~/.cache/alfworld`` (ALFWorld's own default)."""
    return Path(data_dir or os.environ.get("ALFWORLD_DATA") or "~/.cache/alfworld").expanduser()


def download_hint(root: Path) -> str:
    return f"download it with: ALFWORLD_DATA={root} alfworld-download   (pip install 'grpo_lab[alfworld]' provides the command)"


@functools.lru_cache(maxsize=8)
def game_files(root: Path, split: str, task_types: tuple[int, ...]) -> tuple[Path, ...]:
    """The split's playable games, sorted; raises ``FileNotFoundError`` naming what is
    missing and how to download it."""
    split_dir = root / "json_2.1.1" / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"ALFWorld data not found: {split_dir} does not exist; {download_hint(root)}")
    wanted = {TASK_TYPES[t] for t in task_types}
    games = []
    for traj in sorted(split_dir.glob("*/*/traj_data.json")):
        trial = traj.parent
        if "movable" in str(trial) or "Sliced" in str(trial):
            continue
        game = trial / "game.tw-pddl"
        if not game.is_file():
            continue
        if json.loads(traj.read_text()).get("task_type") not in wanted:
            continue
        if not json.loads(game.read_text()).get("solvable", False):
            continue
        games.append(game)
    if not games:
        raise FileNotFoundError(f"ALFWorld data incomplete: no solvable game.tw-pddl of task types {sorted(task_types)} "
                                f"under {split_dir}; {download_hint(root)}")
    return tuple(games)


def strip_banner(text: str) -> str:
    return text.replace(BANNER, "", 1).strip()


def task_of(first_observation: str) -> str | None:
    """The task of a game from its first observation (the text after "Your task is to: ")."""
    at = first_observation.find(TASK_PREFIX)
    return first_observation[at + len(TASK_PREFIX):].strip() if at >= 0 else None


def render(feedback: str, admissible: Sequence[str], show_admissible: bool = True) -> str:
    """The observation text: the game's text and the admissible commands (without ``help``)."""
    text = strip_banner(feedback)
    if show_admissible:
        text += "\nAdmissible commands: " + ", ".join(c for c in admissible if c != "help")
    return text


def normalize_command(command: str) -> str:
    return " ".join(command.lower().split())


def import_alfworld():
    try:
        import textworld.gym  # noqa: F401
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    except ImportError as err:
        raise ImportError(f"env=alfworld needs the alfworld package ({err}): pip install 'grpo_lab[alfworld]'") from None
    return AlfredDemangler, AlfredInfos


class ALFWorldEnv:
    """See the module docstring. One instance runs one episode at a time."""

    instruction = INSTRUCTION

    def __init__(self, split: str = "train", data_dir: str | None = None, task_types: Sequence[int] = (1, 2, 3, 4, 5, 6),
                 show_admissible: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        bad = sorted(set(task_types) - set(TASK_TYPES))
        if bad or not task_types:
            raise ValueError(f"task_types must be a non-empty subset of {sorted(TASK_TYPES)} ({TASK_TYPES}), got {list(task_types)}")
        import_alfworld()
        self.root = data_root(data_dir)
        self.games = game_files(self.root, split, tuple(sorted(set(task_types))))
        self.show_admissible = show_admissible
        self._env: Any = None
        self._game: Path | None = None
        self.feedback = ""
        self.admissible: list[str] = []
        self.facts: tuple[str, ...] = ()
        self.task: str | None = None
        self.done = True

    def _open(self, game: Path) -> Any:
        """A TextWorld gym environment of one game, built as ALFWorld builds its own."""
        import textworld
        import textworld.gym

        demangler, alfred_infos = import_alfworld()
        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True, extras=["gamefile"])
        env_id = textworld.gym.register_game(str(game), infos, max_episode_steps=10_000,
                                             wrappers=[demangler(shuffle=False), alfred_infos])
        return textworld.gym.make(env_id)

    def reset(self, seed: int) -> Observation:
        game = self.games[int(seed) % len(self.games)]
        if game != self._game:
            self.close()
            self._env, self._game = self._open(game), game
        feedback, infos = self._env.reset()
        self._update(feedback, infos)
        self.task, self.done = task_of(feedback), False
        return self._observe()

    def _update(self, feedback: str, infos: dict) -> None:
        self.feedback = feedback
        self.admissible = list(infos["admissible_commands"])
        self.facts = tuple(sorted(map(str, infos.get("facts") or ())))

    def legal_actions(self) -> list[str]:
        self._check_running()
        return [c for c in self.admissible if c != "help"]

    def step(self, action: str) -> StepResult:
        self._check_running()
        command = normalize_command(action)
        if command not in self.admissible:
            obs = Observation(f"{NOTHING}\n\n{self._observe().text}", self._anchor())
            return StepResult(obs, 0.0, False, {"won": False, "valid_action": False})
        feedback, _, done, infos = self._env.step(command)
        self._update(feedback, infos)
        won = bool(infos["won"])
        self.done = bool(done or won)
        return StepResult(self._observe(), WIN_REWARD if won else 0.0, self.done, {"won": won, "valid_action": True})

    def _anchor(self) -> tuple:
        return (str(self._game), self.facts)

    def _observe(self) -> Observation:
        return Observation(render(self.feedback, self.admissible, self.show_admissible and not self.done), self._anchor())

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._game, self.done = None, None, True

    def _check_running(self) -> None:
        if self.done or self._env is None:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
