"""FrozenLake for agent RL on text: gymnasium's ``FrozenLake-v1`` with a text rendering.

The agent walks on a grid of ice (``.``) and holes (``H``) to the goal ``G``. Moves are
``left``, ``right``, ``up`` and ``down``. Reaching the goal gives reward 1 and ends the
episode; stepping into a hole ends it with reward 0. The transitions, rewards and
slipping (``is_slippery``: the intended move with probability 1/3, each perpendicular
one otherwise) are gymnasium's own, from ``gymnasium.envs.toy_text.FrozenLakeEnv``
seeded by the episode seed, so an episode is a deterministic function of its seed and
actions.

Maps:

- ``map_name="4x4"`` or ``"8x8"``: gymnasium's named maps, started at their ``S``.
- ``generator="holes"`` (default): a ``size x size`` map with exactly ``num_holes`` holes
  and the goal in the bottom-right corner, on which *every* ice cell reaches the goal;
  the episode seed draws the start cell among the ice cells.
- ``generator="gymnasium"``: gymnasium's ``generate_random_map(size, p=frozen_prob)``
  (a path from ``S`` in the top-left corner to the goal), started at ``S``.
- ``map_mode="fixed"``: one map (drawn from ``map_seed``) for every episode;
  ``"random"``: the episode seed draws the map.

Departures from gymnasium, chosen for agent RL on text:

- A move off the grid is *illegal*: the state does not change, no gymnasium step is
  taken, and ``info["valid_action"]`` is False (gymnasium treats it as a no-op). Unknown
  words are illegal too. (With ``is_slippery`` a legal move may still slip into the
  wall, which gymnasium resolves as staying put.)
- The start cell may be any ice cell (``generator="holes"``), drawn from the seed: the
  start cell of gymnasium's map is set per episode.
- The observation names the agent's and the goal's coordinates beside the grid picture.

The anchor is the exact state: ``(map rows, agent row, agent column)``.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from .base import Observation, StepResult

MOVES: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
GYM_ACTIONS = {"left": 0, "down": 1, "right": 2, "up": 3}  # gymnasium's LEFT, DOWN, RIGHT, UP
MAP_NAMES = ("4x4", "8x8")
GENERATORS = ("holes", "gymnasium")

INSTRUCTION = (
    "Frozen lake: reach the goal G, avoid holes H. Answer with one move in "
    "<action></action>: left, right, up or down. Moves off the grid are invalid."
)


def _gym_frozenlake():
    try:
        from gymnasium.envs.toy_text import frozen_lake
    except ImportError as err:  # pragma: no cover - gymnasium is a dependency
        raise ImportError("the frozenlake environment needs gymnasium: pip install gymnasium") from err
    return frozen_lake


def _reachable(grid: list[str], start: tuple[int, int], goal: tuple[int, int]) -> bool:
    n = len(grid)
    seen = {start}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if (r, c) == goal:
            return True
        for dr, dc in MOVES.values():
            nr, nc = r + dr, c + dc
            if 0 <= nr < n and 0 <= nc < n and (nr, nc) not in seen and grid[nr][nc] != "H":
                seen.add((nr, nc))
                queue.append((nr, nc))
    return False


def generate_map(size: int, num_holes: int, rng: random.Random) -> tuple[str, ...]:
    """A ``size x size`` map with ``num_holes`` holes and the goal in the bottom-right
    corner, such that every ice cell can reach the goal (gymnasium's generator only
    guarantees a path from its fixed start)."""
    cells = [(r, c) for r in range(size) for c in range(size) if (r, c) != (size - 1, size - 1)]
    goal = (size - 1, size - 1)
    for _ in range(1000):
        holes = set(rng.sample(cells, num_holes))
        grid = [
            "".join("G" if (r, c) == goal else "H" if (r, c) in holes else "." for c in range(size))
            for r in range(size)
        ]
        ice = [cell for cell in cells if cell not in holes]
        if all(_reachable(grid, cell, goal) for cell in ice):
            return tuple(grid)
    raise RuntimeError(f"could not place {num_holes} holes on a {size}x{size} map with every cell reaching the goal")


def from_gym_desc(desc: list[str]) -> tuple[tuple[str, ...], tuple[int, int]]:
    """Our map rows (``.``, ``H``, ``G``) and the start cell of a gymnasium map (``S``
    marks the start, ``F`` ice)."""
    start = next(((r, row.index("S")) for r, row in enumerate(desc) if "S" in row), None)
    if start is None:
        raise ValueError(f"a gymnasium map needs a start cell S, got {desc!r}")
    return tuple(row.replace("S", ".").replace("F", ".") for row in desc), start


def to_gym_desc(grid: tuple[str, ...], start: tuple[int, int]) -> list[str]:
    """The gymnasium map of our map rows, with ``S`` at ``start``."""
    rows = [row.replace(".", "F") for row in grid]
    r, c = start
    if rows[r][c] != "F":
        raise ValueError(f"the start cell {start} must be ice, it is {grid[r][c]!r}")
    rows[r] = rows[r][:c] + "S" + rows[r][c + 1:]
    return rows


class FrozenLakeEnv:
    """See the module docstring. One instance runs one episode at a time."""

    instruction = INSTRUCTION

    def __init__(self, size: int = 4, num_holes: int = 3, map_mode: str = "fixed", map_seed: int = 0,
                 map_name: str | None = None, generator: str = "holes", frozen_prob: float = 0.8,
                 is_slippery: bool = False) -> None:
        if map_name is not None and map_name not in MAP_NAMES:
            raise ValueError(f"map_name must be null or one of {list(MAP_NAMES)} (gymnasium's maps), got {map_name!r}")
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {list(GENERATORS)}, got {generator!r}")
        if map_mode not in ("fixed", "random"):
            raise ValueError(f"map_mode must be 'fixed' or 'random', got {map_mode!r}")
        if map_name is not None and map_mode != "fixed":
            raise ValueError(f"map_name={map_name!r} is one fixed map: it needs map_mode='fixed', got {map_mode!r}")
        if not 0 < frozen_prob <= 1:
            raise ValueError(f"frozen_prob must be in (0, 1], got {frozen_prob}")
        self.is_slippery = bool(is_slippery)
        self.map_mode, self.map_seed, self.generator, self.frozen_prob = map_mode, map_seed, generator, frozen_prob
        self._fixed: tuple[tuple[str, ...], tuple[int, int] | None] | None = None
        if map_name is not None:
            grid, start = from_gym_desc(_gym_frozenlake().MAPS[map_name])
            size = len(grid)
            self._fixed = (grid, start)
        if size < 2:
            raise ValueError(f"size must be at least 2, got {size}")
        if map_name is None and generator == "holes" and not 0 <= num_holes <= size * size - 3:
            raise ValueError(f"num_holes must be in [0, {size * size - 3}] for size {size}, got {num_holes}")
        self.size, self.num_holes = size, num_holes
        if self._fixed is None and map_mode == "fixed":
            self._fixed = self._draw_map(random.Random(map_seed), map_seed)
        self._gym: Any = None
        self._gym_key: tuple | None = None
        self.grid: tuple[str, ...] | None = None
        self.pos: tuple[int, int] = (0, 0)
        self.done = True

    @property
    def goal(self) -> tuple[int, int]:
        grid = self.grid if self.grid is not None else (self._fixed[0] if self._fixed is not None else None)
        if grid is None:
            return (self.size - 1, self.size - 1)
        return next((r, row.index("G")) for r, row in enumerate(grid) if "G" in row)

    def _draw_map(self, rng: random.Random, seed: int) -> tuple[tuple[str, ...], tuple[int, int] | None]:
        """A map and its start (``None``: drawn per episode among the ice cells)."""
        if self.generator == "holes":
            return generate_map(self.size, self.num_holes, rng), None
        desc = _gym_frozenlake().generate_random_map(size=self.size, p=self.frozen_prob, seed=seed)
        return from_gym_desc(desc)

    def reset(self, seed: int) -> Observation:
        rng = random.Random(seed)
        grid, start = self._fixed if self._fixed is not None else self._draw_map(rng, seed)
        if start is None:
            start = rng.choice([(r, c) for r in range(self.size) for c in range(self.size) if grid[r][c] == "."])
        return self._start(grid, start, seed)

    def set_state(self, grid: tuple[str, ...], pos: tuple[int, int], seed: int = 0) -> Observation:
        """Put the environment in an exact state (for tests and tree search); ``seed``
        seeds the slipping from there."""
        if len(grid) != self.size or any(len(row) != self.size for row in grid):
            raise ValueError(f"grid must be {self.size}x{self.size}, got {grid!r}")
        return self._start(tuple(grid), pos, seed)

    def _start(self, grid: tuple[str, ...], start: tuple[int, int], seed: int) -> Observation:
        key = (grid, start)
        if self._gym_key != key:  # the transition table depends on the map and the start
            self._gym = _gym_frozenlake().FrozenLakeEnv(desc=to_gym_desc(grid, start), is_slippery=self.is_slippery)
            self._gym_key = key
        state, _ = self._gym.reset(seed=int(seed))
        self.grid, self.done = grid, False
        self.pos = divmod(int(state), self.size)
        return self._observe()

    def legal_actions(self) -> list[str]:
        self._check_running()
        r, c = self.pos
        return [a for a, (dr, dc) in MOVES.items() if 0 <= r + dr < self.size and 0 <= c + dc < self.size]

    def step(self, action: str) -> StepResult:
        self._check_running()
        move = action.strip().lower()
        if move not in MOVES or move not in self.legal_actions():
            return StepResult(self._observe(), 0.0, False, {"won": False, "valid_action": False})
        state, reward, terminated, _, _ = self._gym.step(GYM_ACTIONS[move])
        self.pos = divmod(int(state), self.size)
        won = self.grid[self.pos[0]][self.pos[1]] == "G"
        self.done = bool(terminated)
        return StepResult(self._observe(), float(reward), self.done, {"won": won, "valid_action": True})

    def render(self) -> str:
        rows = []
        for r, row in enumerate(self.grid):
            cells = ["P" if (r, c) == self.pos and row[c] == "." else row[c] for c in range(self.size)]
            rows.append(" ".join(cells))
        return "\n".join(rows)

    def _observe(self) -> Observation:
        r, c = self.pos
        gr, gc = self.goal
        text = f"{self.render()}\nYou are at row {r + 1}, column {c + 1}. The goal is at row {gr + 1}, column {gc + 1}."
        return Observation(text=text, anchor=(self.grid, r, c))

    def close(self) -> None:
        self._gym, self._gym_key = None, None

    def _check_running(self) -> None:
        if self.grid is None or self.done:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
