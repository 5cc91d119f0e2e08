"""Countdown: reach a target number with arithmetic on given numbers (single-turn).

The task shows a few numbers and a target; the answer is an arithmetic expression in
``<answer>...</answer>`` that uses each given number at most once, with ``+ - * /`` and
parentheses, and evaluates exactly (rational arithmetic) to the target. This is the
verifiable single-turn task of TinyZero and of the papers that study GRPO variants on it
(AR3PO, F-GRPO).

Tasks are generated into a ``datasets.Dataset`` (:func:`generate_tasks`): each draws
``num_numbers`` numbers in ``[1, max_number]`` and makes the target from a random
expression over two or more of them (so every task is solvable), kept when it is a
positive integer at most ``max_target``. ``reset(seed)`` plays task ``seed % num_tasks``
of the dataset generated from ``dataset_seed``.

Reward: 1 for a correct expression, 0 otherwise. TinyZero gives a well-formed but wrong
expression 0.1; here that share is ``format_reward`` (default 0), since the trainer's
``algo.invalid_action_penalty`` already prices answers that are not expressions over the
numbers (``info["valid_action"]`` is False for them: no ``<answer>`` tag, a number not
offered or used twice, another operator, division by zero).

The anchor is the task, ``(numbers, target)``. ``legal_actions()`` returns a few random
well-formed expressions over the task's numbers (the format warm-up's answers and the
random policy's), drawn without regard to the target.
"""

from __future__ import annotations

import ast
import functools
import random
import warnings
from collections import Counter
from fractions import Fraction

from .base import Observation, StepResult, TextFormat

OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

INSTRUCTION = (
    "Countdown: make the target number from the given numbers with + - * / and parentheses, using each number "
    "at most once. Answer with the expression in <answer></answer>, for example <answer>(7 - 3) * 5</answer>."
)


class InvalidExpression(ValueError):
    """An answer that is not an arithmetic expression over the offered numbers."""


def evaluate(expression: str, numbers: tuple[int, ...]) -> Fraction:
    """The exact value of ``expression``, which may use each of ``numbers`` at most once
    (integers, ``+ - * /``, parentheses); raises :class:`InvalidExpression` naming what
    is wrong."""
    if len(expression) > 200:
        raise InvalidExpression(f"expression longer than 200 characters ({len(expression)})")
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" and the like: a model's answer, not our code
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise InvalidExpression(f"not an arithmetic expression: {expression!r}") from None
    used: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise InvalidExpression("division by zero")
            return left / right
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise InvalidExpression(f"only integers, + - * / and parentheses are allowed, got {ast.unparse(node)!r}")

    result = value(tree.body)
    extra = Counter(used) - Counter(numbers)
    if extra:
        raise InvalidExpression(f"uses {sorted(extra.elements())} beyond the numbers {list(numbers)}")
    return result


def random_expression(numbers: tuple[int, ...], rng: random.Random, min_terms: int = 2) -> str:
    """A random well-formed expression over a random subset (at least ``min_terms``) of
    ``numbers``, each used once, with random operators and bracketing (never a division
    by zero)."""
    while True:
        k = rng.randint(min(min_terms, len(numbers)), len(numbers))
        terms = [str(n) for n in rng.sample(list(numbers), k)]
        while len(terms) > 1:
            i = rng.randrange(len(terms) - 1)
            op = rng.choice("+-*/")
            combined = f"{terms[i]} {op} {terms[i + 1]}"
            terms[i:i + 2] = [f"({combined})" if len(terms) > 2 else combined]
        try:
            evaluate(terms[0], numbers)
        except InvalidExpression:  # a division by a zero difference: draw again
            continue
        return terms[0]


def make_task(rng: random.Random, num_numbers: int, max_number: int, max_target: int) -> dict:
    """One solvable task: ``{"numbers", "target", "solution"}``."""
    for _ in range(10_000):
        numbers = tuple(rng.randint(1, max_number) for _ in range(num_numbers))
        solution = random_expression(numbers, rng)
        target = evaluate(solution, numbers)
        if target.denominator == 1 and 1 <= target <= max_target:
            return {"numbers": list(numbers), "target": int(target), "solution": solution}
    raise RuntimeError(f"no task with a target in [1, {max_target}] from {num_numbers} numbers up to {max_number}")


def generate_tasks(num_tasks: int = 10_000, num_numbers: int = 3, max_number: int = 10, max_target: int = 50,
                   seed: int = 0):
    """A ``datasets.Dataset`` of ``num_tasks`` tasks (columns ``numbers``, ``target``,
    ``solution``), the same for the same arguments."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [make_task(rng, num_numbers, max_number, max_target) for _ in range(num_tasks)]
    return Dataset.from_list(rows)


@functools.lru_cache(maxsize=4)
def _tasks(num_tasks: int, num_numbers: int, max_number: int, max_target: int, seed: int):
    ds = generate_tasks(num_tasks, num_numbers, max_number, max_target, seed)
    return list(zip((tuple(n) for n in ds["numbers"]), ds["target"]))


class CountdownEnv:
    """See the module docstring. One instance runs one episode at a time."""

    instruction = INSTRUCTION
    text_format = TextFormat(tags=("answer",))

    def __init__(self, num_tasks: int = 10_000, num_numbers: int = 3, max_number: int = 10, max_target: int = 50,
                 dataset_seed: int = 0, format_reward: float = 0.0, num_sample_actions: int = 4) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if num_numbers < 2:
            raise ValueError(f"num_numbers must be >= 2, got {num_numbers}")
        if max_number < 1 or max_target < 1:
            raise ValueError(f"max_number and max_target must be >= 1, got {max_number} and {max_target}")
        if num_sample_actions < 1:
            raise ValueError(f"num_sample_actions must be >= 1, got {num_sample_actions}")
        self.tasks = _tasks(num_tasks, num_numbers, max_number, max_target, dataset_seed)
        self.format_reward = float(format_reward)
        self.num_sample_actions = num_sample_actions
        self.numbers: tuple[int, ...] = ()
        self.target = 0
        self.seed = 0
        self.done = True

    def reset(self, seed: int) -> Observation:
        self.seed = int(seed)
        self.numbers, self.target = self.tasks[self.seed % len(self.tasks)]
        self.done = False
        return self._observe()

    def legal_actions(self) -> list[str]:
        self._check_running()
        rng = random.Random(self.seed)
        return [random_expression(self.numbers, rng, min_terms=1) for _ in range(self.num_sample_actions)]

    def step(self, action: str) -> StepResult:
        self._check_running()
        self.done = True
        try:
            value = evaluate(action, self.numbers)
        except InvalidExpression as err:
            return StepResult(self._observe("invalid: " + str(err)), 0.0, True, {"won": False, "valid_action": False})
        won = value == self.target
        reward = 1.0 if won else self.format_reward
        return StepResult(self._observe(f"{action} = {value}"), reward, True, {"won": won, "valid_action": True})

    def _observe(self, result: str | None = None) -> Observation:
        text = f"Numbers: {' '.join(map(str, self.numbers))}\nTarget: {self.target}"
        if result is not None:
            text += f"\nYour answer: {result}"
        return Observation(text=text, anchor=(self.numbers, self.target))

    def _check_running(self) -> None:
        if self.done:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
