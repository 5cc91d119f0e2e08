"""TextWorld text adventures, generated offline and played through the ``textworld`` API.

``challenge="tw-simple"`` (fetch the missing ingredient across a six-room house) or
``"tw-cooking"`` (read the cookbook, gather, cut and cook the ingredients, eat the meal),
with ``settings`` merged over the challenge's defaults (:data:`DEFAULT_SETTINGS`; they are
``tw-make``'s options: ``tw-make tw-cooking --recipe 2 --take 2 --go 6 --open --cook``
is ``settings={recipe: 2, take: 2, go: 6, open: true, cook: true}``). Episode ``seed``
plays game ``seed % num_games`` of a pool generated from ``game_seed``; each game is
generated at first use into ``cache_dir`` (published atomically, so worker processes may
race) and reused afterwards. Generation takes one to four seconds per game.

The observation is the game's text without its banner and status line, followed by the
admissible commands (``show_admissible``). An action is valid when it is one of the
admissible commands (case and spacing aside); any other is answered "That command is
not available here." without reaching the game, because the game's parser accepts some
commands that TextWorld does not track, which would put the engine and the state out
of step. The reward is the game's score gained by the step (its points); ``won`` and
``lost`` come from the game. The anchor is the game state: ``(game, score, sorted facts)``
(facts alone can return to an earlier set after a scored step).

Needs the optional ``textworld`` package: ``pip install 'grpo_lab[textworld]'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .base import Observation, StepResult

CHALLENGES = ("tw-simple", "tw-cooking")
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "tw-simple": {"rewards": "dense", "goal": "detailed", "test": False},
    "tw-cooking": {"recipe": 1, "take": 1, "go": 1, "open": False, "cook": False, "cut": False, "drop": False,
                   "recipe_seed": 0, "split": None},
}
INSTRUCTION = (
    "Text adventure: reach the goal that the game describes. Answer with one of the admissible commands in "
    "<action></action>, for example <action>open door</action>."
)
UNAVAILABLE = "That command is not available here."
_BANNER = re.compile(r"^[ _|\\$/<>]*$")
_END_PROMPT = "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?"


def import_textworld():
    try:
        import textworld
        import textworld.challenges  # noqa: F401
    except ImportError as err:
        raise ImportError(f"env=textworld needs the textworld package ({err}): pip install 'grpo_lab[textworld]'") from None
    return textworld


def default_cache_dir() -> Path:
    """``$GRPO_LAB_CACHE/textworld``, else ``~/.cache/grpo_lab/textworld``."""
    root = os.environ.get("GRPO_LAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grpo_lab")
    return Path(root) / "textworld"


def clean_text(text: str) -> str:
    """Game text without the title banner, the trailing prompt and status line, and the
    restart question after an ending."""
    cut = text.rfind("\n>")
    if cut != -1:
        text = text[:cut]
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and _BANNER.match(lines[0]):
        lines.pop(0)
    text = "\n".join(lines).replace(_END_PROMPT, "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def normalize_command(command: str) -> str:
    return " ".join(command.lower().split())


def game_path(challenge: str, settings: dict[str, Any], seed: int, cache_dir: Path) -> Path:
    """Where the game of ``(challenge, settings, seed)`` lives in the cache."""
    key = hashlib.sha1(json.dumps([challenge, settings, seed], sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"{challenge}-{key}-{seed}.z8"


def generate_game(challenge: str, settings: dict[str, Any], seed: int, cache_dir: Path) -> Path:
    """The cached game (``.z8`` beside its ``.json``), generated first when missing. It is
    built in a private directory and moved in, the ``.z8`` last, so a ``.z8`` in the cache
    is always complete."""
    path = game_path(challenge, settings, seed, cache_dir)
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    textworld = import_textworld()
    from textworld.generator import compile_game

    cache_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".building-"))
    try:
        options = textworld.GameOptions()
        options.seeds = int(seed)
        options.path = str(build / "game.z8")
        options.force_recompile = True
        make = textworld.challenges.CHALLENGES[challenge][1]
        compile_game(make(dict(settings), options), options)
        os.replace(build / "game.json", path.with_suffix(".json"))
        os.replace(build / "game.z8", path)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return path


class TextWorldEnv:
    """See the module docstring. One instance runs one episode at a time (one game engine)."""

    instruction = INSTRUCTION

    def __init__(self, challenge: str = "tw-simple", settings: dict[str, Any] | None = None, num_games: int = 8,
                 game_seed: int = 0, cache_dir: str | None = None, show_admissible: bool = True) -> None:
        if challenge not in CHALLENGES:
            raise ValueError(f"challenge must be one of {list(CHALLENGES)}, got {challenge!r}")
        unknown = sorted(set(settings or {}) - set(DEFAULT_SETTINGS[challenge]))
        if unknown:
            raise ValueError(f"settings {unknown} are not options of {challenge}; its options: "
                             f"{DEFAULT_SETTINGS[challenge]}")
        if num_games < 1:
            raise ValueError(f"num_games must be >= 1, got {num_games}")
        import_textworld()  # fail at configuration time, with the install command
        self.challenge = challenge
        self.settings = {**DEFAULT_SETTINGS[challenge], **(settings or {})}
        self.num_games, self.game_seed, self.show_admissible = num_games, game_seed, show_admissible
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._env: Any = None
        self._game: Path | None = None
        self.state: Any = None
        self.text = ""
        self.done = True

    def game_for(self, seed: int) -> Path:
        """The game file episode ``seed`` plays (generated when missing)."""
        return generate_game(self.challenge, self.settings, self.game_seed + int(seed) % self.num_games, self.cache_dir)

    def reset(self, seed: int) -> Observation:
        textworld = import_textworld()
        game = self.game_for(seed)
        if self._env is None:
            infos = textworld.EnvInfos(feedback=True, facts=True, admissible_commands=True, won=True, lost=True,
                                       score=True, max_score=True)
            with warnings.catch_warnings():  # jericho: "not fully supported" (TextWorld tracks the state itself)
                warnings.filterwarnings("ignore", message=".*not fully supported.*")
                self._env = textworld.start(str(game), request_infos=infos)
        elif game != self._game:
            self._env.load(str(game))
        self._game = game
        self.state = self._env.reset()
        self.text, self.done = clean_text(self.state["feedback"]), False
        return self._observe()

    def legal_actions(self) -> list[str]:
        self._check_running()
        return list(self.state["admissible_commands"])

    def step(self, action: str) -> StepResult:
        self._check_running()
        command = normalize_command(action)
        if command not in self.state["admissible_commands"]:
            return StepResult(self._observe(UNAVAILABLE), 0.0, False, {"won": False, "valid_action": False})
        before = self.state["score"]
        self.state, score, done = self._env.step(command)
        won, lost = bool(self.state["won"]), bool(self.state["lost"])
        self.done = bool(done or won or lost)  # after an ending the game would take more commands: stop here
        self.text = clean_text(self.state["feedback"])
        info = {"won": won, "valid_action": True, "lost": lost, "score": score, "max_score": self.state["max_score"]}
        return StepResult(self._observe(), float(score - before), self.done, info)

    def _observe(self, feedback: str | None = None) -> Observation:
        text = self.text if feedback is None else f"{feedback}\n\n{self.text}"
        if self.show_admissible and not self.done:
            text += "\nAdmissible commands: " + ", ".join(self.state["admissible_commands"])
        anchor = (self._game.name, self.state["score"], tuple(sorted(map(str, self.state["_facts"]))))
        return Observation(text, anchor)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._game, self.done = None, None, True

    def _check_running(self) -> None:
        if self.done or self.state is None:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
