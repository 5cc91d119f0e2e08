"""Function calling, single turn, scored with ToolRL's rewards (``env=tool_calls``).

Each task shows a few tool schemas and a user request; the answer is ToolRL's format,
``<think>...</think>`` then a ``<tool_call>`` block (one JSON call per line,
``{"name": ..., "parameters": {...}}``) or a ``<response>...</response>`` when no tool
fits. The tasks are generated offline from ``dataset_seed`` (no download): eight tools of
one to three parameters; a request needs one call, two calls (of the same or of two
tools), or none (a greeting or a question the tools cannot serve); every task shows the
tools it needs and one or two others. ``data_path`` reads ToolRL's released data instead
(:func:`load_toolrl`).

The reward is ToolRL's (:mod:`grpo_lab.envs.toolrl`): format (0 or 1) plus the
fine-grained correctness (-3 to 3), or, with ``reward="exact"``, 1 for an answer whose
format and calls are both exactly right and 0 otherwise (the coarse baseline of the
paper's ablation; a task that needs no call is exactly answered by the right structure,
a response and no call). ``won`` is the exact answer either way; ``info["rewards"]`` holds the
format and correctness parts (logged as ``reward/format`` and ``reward/correctness``).
``legal_actions()`` returns well-formed answers with random calls or a random response,
never chosen for being right. The anchor is the task index.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from .base import Observation, StepResult, TextFormat
from .toolrl import CORRECT_MAX, correctness_score, format_score

INSTRUCTION = ("You can call tools. Think in <think></think>, then either call tools, one JSON object per line "
               "inside <tool_call></tool_call>, or answer the user in <response></response>.")

CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Perth")
CURRENCIES = ("USD", "EUR", "JPY", "GBP", "INR")
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Femi")
#: name -> (description, {parameter: values it takes}, request template)
TOOLS: dict[str, tuple[str, dict[str, tuple], str]] = {
    "get_weather": ("current weather of a city", {"city": CITIES}, "What is the weather in {city}?"),
    "get_time": ("local time in a city", {"city": CITIES}, "What time is it in {city}?"),
    "convert_currency": ("convert an amount", {"amount": (5, 10, 20, 50, 100), "source": CURRENCIES,
                                               "target": CURRENCIES}, "Convert {amount} {source} to {target}."),
    "send_message": ("send a text message", {"to": NAMES, "text": ("hello", "on my way", "call me")},
                     "Send {to} the message '{text}'."),
    "set_alarm": ("set an alarm", {"hour": (6, 7, 8, 9), "minute": (0, 15, 30)}, "Wake me at {hour}:{minute:02d}."),
    "add": ("add two numbers", {"a": (2, 3, 7, 12), "b": (4, 5, 9, 30)}, "What is {a} plus {b}?"),
    "find_flight": ("search flights", {"origin": CITIES, "destination": CITIES}, "Find a flight from {origin} to {destination}."),
    "play_song": ("play a song", {"title": ("Blue", "Rain", "Home")}, "Play the song {title}."),
}
NO_CALL = (("Hello there!", "Hello! How can I help?"), ("Thanks a lot.", "You are welcome."),
           ("Tell me a joke.", "I have no tool for jokes, sorry."), ("What is your name?", "I am your assistant."))


def schema(name: str) -> dict[str, Any]:
    """The JSON schema the prompt shows for tool ``name``."""
    description, params, _ = TOOLS[name]
    props = {p: {"type": "integer" if isinstance(v[0], int) else "string"} for p, v in params.items()}
    return {"name": name, "description": description, "parameters": {"type": "object", "properties": props,
                                                                        "required": list(params)}}


def random_call(rng: random.Random, name: str) -> dict[str, Any]:
    _, params, _ = TOOLS[name]
    values = {p: rng.choice(v) for p, v in params.items()}
    if name == "convert_currency":
        while values["source"] == values["target"]:
            values["target"] = rng.choice(CURRENCIES)
    if name == "find_flight":
        while values["origin"] == values["destination"]:
            values["destination"] = rng.choice(CITIES)
    return {"name": name, "parameters": values}


def request_of(call: dict[str, Any]) -> str:
    return TOOLS[call["name"]][2].format(**call["parameters"])


def answer_text(calls: list[dict[str, Any]] | None, response: str | None = None) -> str:
    """ToolRL's answer form: think, then the call block or the response."""
    if calls:
        return "<think>call</think>\n<tool_call>\n" + "\n".join(json.dumps(c) for c in calls) + "\n</tool_call>"
    return f"<think>no tool</think>\n<response>{response}</response>"


def generate_tasks(num_tasks: int, seed: int) -> tuple[tuple[str, str, str], ...]:
    """``(system, user, gold)`` tasks: a third need one call, a third two calls, the rest
    (one in six) no call; each shows its tools and one or two more."""
    rng = random.Random(seed)
    names = sorted(TOOLS)
    tasks = []
    for _ in range(num_tasks):
        kind = rng.random()
        if kind < 1 / 6:
            user, reply = rng.choice(NO_CALL)
            needed, gold = [], answer_text(None, reply)
        else:
            count = 1 if kind < 7 / 12 else 2
            calls = [random_call(rng, rng.choice(names)) for _ in range(count)]
            user = " ".join(request_of(c) for c in calls)
            needed, gold = [c["name"] for c in calls], answer_text(calls)
        others = [n for n in names if n not in needed]
        shown = sorted(set(needed) | set(rng.sample(others, rng.randint(1, 2))))
        system = INSTRUCTION + "\nTools:\n" + "\n".join(json.dumps(schema(n)) for n in shown)
        tasks.append((system, user, gold))
    return tuple(tasks)


def load_toolrl(path: str) -> tuple[tuple[str, str, str], ...]:
    """``(system, user, gold)`` tasks of ToolRL's released data: ``rlla_rl.json`` (a JSON
    list of ``{"instruction", "input", "output"}``) or the same as JSON lines; a task
    without those fields raises, naming the file and the entry."""
    text = Path(path).read_text(encoding="utf-8")
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                     if line.strip()]
    tasks = []
    for k, row in enumerate(rows):
        missing = [f for f in ("instruction", "input", "output") if f not in row]
        if missing:
            raise ValueError(f"{path} entry {k}: missing {missing} (ToolRL's rows have instruction, input, output)")
        tasks.append((str(row["instruction"]), str(row["input"]), str(row["output"])))
    if not tasks:
        raise ValueError(f"{path} holds no tasks")
    return tuple(tasks)


@functools.lru_cache(maxsize=4)
def _tasks(num_tasks: int, seed: int, data_path: str | None) -> tuple[tuple[str, str, str], ...]:
    return load_toolrl(data_path) if data_path else generate_tasks(num_tasks, seed)


class ToolCallsEnv:
    """See the module docstring. One instance runs one episode at a time."""

    instruction = ""  # each task's system text carries the instruction and its tools
    text_format = TextFormat(tags=(), framed=False)

    def __init__(self, num_tasks: int = 2000, dataset_seed: int = 0, data_path: str | None = None,
                 reward: str = "toolrl") -> None:
        if reward not in ("toolrl", "exact"):
            raise ValueError(f"reward must be 'toolrl' or 'exact', got {reward!r}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.tasks, self.reward = _tasks(num_tasks, dataset_seed, data_path), reward
        self.index, self.seed, self.done = -1, 0, True

    def reset(self, seed: int) -> Observation:
        self.seed, self.done = int(seed), False
        self.index = self.seed % len(self.tasks)
        system, user, _ = self.tasks[self.index]
        return Observation(f"{system}\nUser: {user}", ("tool task", self.index))

    def legal_actions(self) -> list[str]:
        if self.done:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
        rng = random.Random(self.seed * 7_919 + 1)
        calls = [answer_text([random_call(rng, rng.choice(sorted(TOOLS))) for _ in range(rng.randint(1, 2))])
                 for _ in range(3)]
        return calls + [answer_text(None, rng.choice(NO_CALL)[1])]

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
        gold = self.tasks[self.index][2]
        fmt, correct = format_score(action, gold), correctness_score(action, gold)
        exact = fmt == 1.0 and (correct == CORRECT_MAX if "<tool_call>" in gold else True)
        self.done = True
        reward = fmt + correct if self.reward == "toolrl" else float(exact)
        info = {"won": exact, "valid_action": fmt == 1.0, "rewards": {"format": fmt, "correctness": correct}}
        return StepResult(Observation("", ("tool task", self.index)), reward, True, info)
