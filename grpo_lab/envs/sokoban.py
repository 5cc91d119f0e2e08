"""Sokoban: push every box onto a target.

The player moves ``up``, ``down``, ``left`` or ``right``; walking into a box pushes it one
cell when the cell behind it is free (no pulling, no pushing into a wall or another box).
The episode ends when every box is on a target.

Levels are generated per seed by reverse play, as gym-sokoban's generator does (Schrader,
2018, after Murase et al., 1996): a room is carved by a random walk inside the walls,
targets and the player are placed on its floor with every box on a target (the solved
state), and the player then plays backwards (moving, and pulling the box behind it) for
``search_depth`` moves; of ``attempts`` such reverse games the one that moved the boxes
furthest is kept. Reversing those moves solves the level, so every level is solvable.

Reward, as verl-agent's Sokoban (gym-sokoban's ``PushAndPullSokobanEnv`` rewards,
push-only): -0.1 per step, +1 for pushing a box onto a target, -1 for pushing one off,
+10 when the last box reaches its target.

Rendering (verl-agent's symbols): ``#`` wall, ``_`` floor, ``O`` target, ``X`` box,
``√`` box on a target, ``P`` player, ``S`` player on a target. An answer that is not one
of the four moves is invalid (``valid_action=False``) and leaves the state unchanged; a
move blocked by a wall or an immovable box is valid and changes nothing but the step
count (as in gym-sokoban, where it costs the step penalty).

The anchor is the exact state: ``(layout rows, player, sorted boxes)``.
"""

from __future__ import annotations

import random

from .base import Observation, StepResult

MOVES: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
STEP_PENALTY, BOX_ON, BOX_OFF, FINISHED = -0.1, 1.0, -1.0, 10.0

INSTRUCTION = (
    "Sokoban: push every box X onto a target O (a box on a target shows as √). You are P (S on a target); "
    "# is a wall, _ is floor. You can push a box, never pull it. Answer with one move in <action></action>: "
    "up, down, left or right."
)

Cell = tuple[int, int]


def carve_room(height: int, width: int, rng: random.Random, steps: int) -> set[Cell]:
    """Floor cells carved by a random walk (with direction changes) inside a ``height x
    width`` room whose border is wall; each step opens a plus-shaped patch."""
    floor: set[Cell] = set()
    r, c = rng.randrange(1, height - 1), rng.randrange(1, width - 1)
    dr, dc = rng.choice(list(MOVES.values()))
    for _ in range(steps):
        if rng.random() < 0.35:
            dr, dc = rng.choice(list(MOVES.values()))
        r = min(max(r + dr, 1), height - 2)
        c = min(max(c + dc, 1), width - 2)
        for pr, pc in ((0, 0), (0, 1), (1, 0)) if rng.random() < 0.5 else ((0, 0),):
            if 1 <= r + pr <= height - 2 and 1 <= c + pc <= width - 2:
                floor.add((r + pr, c + pc))
    return floor


def reverse_play(floor: set[Cell], targets: set[Cell], player: Cell, rng: random.Random, depth: int
                 ) -> tuple[Cell, frozenset[Cell], int]:
    """Play ``depth`` random reverse moves from the solved state (boxes on the targets):
    the player steps to a free cell and, half the time when a box is right behind it,
    pulls that box along. Returns the player, the boxes, and the moves that pulled."""
    boxes = set(targets)
    pulls = 0
    for _ in range(depth):
        dr, dc = rng.choice(list(MOVES.values()))
        nxt = (player[0] + dr, player[1] + dc)
        if nxt not in floor or nxt in boxes:
            continue
        behind = (player[0] - dr, player[1] - dc)
        if behind in boxes and rng.random() < 0.5:
            boxes.remove(behind)
            boxes.add(player)
            pulls += 1
        player = nxt
    return player, frozenset(boxes), pulls


def generate_level(height: int, width: int, num_boxes: int, rng: random.Random, search_depth: int = 100,
                   attempts: int = 8) -> tuple[frozenset[Cell], frozenset[Cell], frozenset[Cell], Cell]:
    """``(floor, targets, boxes, player)`` of a solvable level (module docstring)."""
    if height < 5 or width < 5:
        raise ValueError(f"a Sokoban room needs at least 5x5 cells with its walls, got {height}x{width}")
    if not 1 <= num_boxes <= (height - 2) * (width - 2) // 4:
        raise ValueError(f"num_boxes={num_boxes} does not fit a {height}x{width} room")
    for _ in range(1000):
        floor = carve_room(height, width, rng, steps=int(1.5 * (height + width)) + 4 * num_boxes)
        if len(floor) < num_boxes + 3:
            continue
        cells = sorted(floor)
        picks = rng.sample(cells, num_boxes + 1)
        targets, start = frozenset(picks[:-1]), picks[-1]
        best = None
        for _ in range(attempts):
            player, boxes, pulls = reverse_play(floor, targets, start, rng, search_depth)
            moved = sum(min(abs(b[0] - t[0]) + abs(b[1] - t[1]) for t in targets) for b in boxes)
            score = pulls * moved if boxes != targets else 0
            if score > 0 and (best is None or score > best[0]):
                best = (score, player, boxes)
        if best is not None:
            return frozenset(floor), frozenset(targets), best[2], best[1]
    raise RuntimeError(f"no level found for a {height}x{width} room with {num_boxes} boxes")


class SokobanEnv:
    """Sokoban on a generated level per seed (module docstring).

    Args:
        height, width: the room, walls included.
        num_boxes: boxes (and targets).
        search_depth: reverse moves played from the solved state.
        attempts: reverse games per level; the one that displaced the boxes most is kept.
    """

    instruction = INSTRUCTION

    def __init__(self, height: int = 6, width: int = 6, num_boxes: int = 1, search_depth: int = 100, attempts: int = 8):
        for name, value in (("search_depth", search_depth), ("attempts", attempts)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        generate_level(height, width, num_boxes, random.Random(0), search_depth, attempts)  # checks the sizes
        self.height, self.width, self.num_boxes = height, width, num_boxes
        self.search_depth, self.attempts = search_depth, attempts

    def reset(self, seed: int) -> Observation:
        self.floor, self.targets, boxes, self.player = generate_level(
            self.height, self.width, self.num_boxes, random.Random(seed), self.search_depth, self.attempts)
        self.boxes = set(boxes)
        self.layout = tuple("".join("O" if (r, c) in self.targets else "_" if (r, c) in self.floor else "#"
                                    for c in range(self.width)) for r in range(self.height))
        return self._observe()

    def legal_actions(self) -> list[str]:
        return list(MOVES)

    def step(self, action: str) -> StepResult:
        move = MOVES.get(action.strip().lower())
        if move is None:
            return StepResult(self._observe(), 0.0, False, {"won": False, "valid_action": False})
        dr, dc = move
        nxt = (self.player[0] + dr, self.player[1] + dc)
        reward = STEP_PENALTY
        if nxt in self.boxes:
            beyond = (nxt[0] + dr, nxt[1] + dc)
            if beyond in self.floor and beyond not in self.boxes:
                self.boxes.remove(nxt)
                self.boxes.add(beyond)
                reward += (BOX_ON if beyond in self.targets else 0.0) + (BOX_OFF if nxt in self.targets else 0.0)
                self.player = nxt
        elif nxt in self.floor:
            self.player = nxt
        won = self.boxes == set(self.targets)
        if won:
            reward += FINISHED
        return StepResult(self._observe(), reward, won, {"won": won, "valid_action": True})

    def render(self) -> str:
        rows = [list(row) for row in self.layout]
        for r, c in self.boxes:
            rows[r][c] = "√" if (r, c) in self.targets else "X"
        r, c = self.player
        rows[r][c] = "S" if (r, c) in self.targets else "P"
        return "\n".join("".join(row) for row in rows)

    def _observe(self) -> Observation:
        on = sum(b in self.targets for b in self.boxes)
        text = f"{self.render()}\nBoxes on targets: {on} of {len(self.targets)}."
        return Observation(text, (self.layout, self.player, tuple(sorted(self.boxes))))


def solve(floor: frozenset[Cell], targets: frozenset[Cell], boxes: frozenset[Cell], player: Cell,
          max_states: int = 200_000) -> int | None:
    """Fewest moves that solve the level (breadth-first search over push moves), or
    ``None`` when no solution exists within ``max_states`` states. For tests on small rooms."""
    from collections import deque

    start = (player, boxes)
    seen = {start}
    queue = deque([(start, 0)])
    while queue:
        (p, bs), dist = queue.popleft()
        if bs == targets:
            return dist
        for dr, dc in MOVES.values():
            nxt = (p[0] + dr, p[1] + dc)
            if nxt not in floor:
                continue
            if nxt in bs:
                beyond = (nxt[0] + dr, nxt[1] + dc)
                if beyond not in floor or beyond in bs:
                    continue
                state = (nxt, (bs - {nxt}) | {beyond})
            else:
                state = (nxt, bs)
            if state not in seen:
                if len(seen) >= max_states:
                    return None
                seen.add(state)
                queue.append((state, dist + 1))
    return None
