"""Any single-turn dataset with reward functions, the way TRL's GRPOTrainer takes one.

``env=dataset env.kwargs.path=DATA env.kwargs.prompt_column=question
env.kwargs.rewards=[mymodule:exact]``: each episode shows one row's prompt and scores the
model's whole answer with the reward functions (:mod:`grpo_lab.envs.rewards`), which
receive ``(prompt, completion, row)``, the row with all its columns. Several rewards add
up with ``reward_weights``; an episode is won when the total reaches
``success_threshold``.

``path`` is what ``datasets.load_dataset`` takes (a hub name, with ``config_name`` for its
configuration, or a local directory of data files), a single local file (``.jsonl``,
``.json``, ``.csv``, ``.parquet``; its rows are the ``train`` split), or a directory
written by ``Dataset.save_to_disk``. ``reset(seed)`` plays row ``seed % len(rows)``.

The prompt column holds text, or a conversation in TRL's format (a list of
``{"role", "content"}`` messages: an optional system message, whose text comes
first, then one user message). The prompt is the instruction (when there is one)
and the row's prompt, with no frame around it; the model's whole answer is the action
(:class:`~grpo_lab.envs.base.TextFormat` without tags), and generation stops at the end
of sequence or ``rollout.max_new_tokens``.

There are no legal actions to demonstrate, so the format warm-up is skipped (a real
model brings its format); ``valid_action`` is True for every non-empty answer. The anchor
is the row, ``("row", index)``. A reward function that raises or returns a non-finite
value fails its episode, which the trainer drops and counts.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

from ..paths import DATA_SUFFIXES, looks_like_local_path
from .base import Observation, StepResult, TextFormat
from .rewards import ANSWER_REWARDS, combine

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@functools.lru_cache(maxsize=4)
def load_rows(path: str, split: str = "train", config_name: str | None = None, data_files: tuple[str, ...] | None = None):
    """The ``datasets.Dataset`` at ``path`` (see the module docstring for what ``path``
    may be); raises ``ValueError`` naming the path and the cause when it cannot load."""
    try:
        from datasets import DatasetDict, load_dataset, load_from_disk
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise ImportError("env=dataset needs the datasets library: pip install datasets") from err
    local = Path(path).expanduser()
    if not local.exists() and looks_like_local_path(path, DATA_SUFFIXES):
        raise ValueError(f"env.kwargs.path={path!r}: no such file or directory ({local.absolute()}); a local data file "
                         "or directory must exist (a hub dataset is 'name' or 'org/name')")
    try:
        if local.is_file():
            builder = FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"unknown data file type {local.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
            ds = load_dataset(builder, data_files=str(local), split="train")
        elif local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            ds = load_from_disk(str(local))
            if isinstance(ds, DatasetDict):
                if split not in ds:
                    raise ValueError(f"split {split!r} not in the saved dataset (splits: {sorted(ds)})")
                ds = ds[split]
        else:
            ds = load_dataset(path, config_name, split=split, data_files=list(data_files) if data_files else None)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"env.kwargs.path={path!r}: cannot load the dataset: {err}") from err
    except Exception as err:  # the hub unreachable, a malformed file...
        raise ValueError(f"env.kwargs.path={path!r}: cannot load the dataset: {type(err).__name__}: {err}") from err
    if len(ds) == 0:
        raise ValueError(f"env.kwargs.path={path!r}: the dataset (split {split!r}) has no rows")
    return ds


def split_prompt(value: Any, column: str) -> tuple[str, str]:
    """``(system text, prompt text)`` of a prompt cell: a string, or a conversation of an
    optional system message and one user message."""
    if isinstance(value, str):
        return "", value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        roles = [m.get("role") for m in value]
        if roles in (["user"], ["system", "user"]):
            system = value[0]["content"] if roles[0] == "system" else ""
            return str(system), str(value[-1]["content"])
        raise ValueError(f"prompt column {column!r}: a conversation must be [system?, user], got roles {roles}")
    raise ValueError(f"prompt column {column!r} must hold text or a list of messages, got {type(value).__name__}: "
                     f"{str(value)[:80]!r}")


@functools.lru_cache(maxsize=4)
def prompt_rows(path: str, split: str, config_name: str | None, data_files: tuple[str, ...] | None, column: str):
    """:func:`load_rows`, with every row's prompt in ``column`` checked
    (:func:`check_prompts`) once per dataset and column."""
    rows = load_rows(path, split, config_name, data_files)
    if column not in rows.column_names:
        raise ValueError(f"env.kwargs.prompt_column={column!r} is not a column of {path!r} (columns: {rows.column_names})")
    check_prompts(rows[column], column, path)
    return rows


def check_prompts(cells: Sequence[Any], column: str, path: str) -> None:
    """Raise ``ValueError`` naming the rows of ``column`` whose prompt is empty (or only
    whitespace) or not a prompt at all: caught when the dataset loads, not by the engine."""
    empty, bad = [], []
    for i, cell in enumerate(cells):
        try:
            _, text = split_prompt(cell, column)
        except ValueError as err:
            bad.append((i, err))
            continue
        if not text.strip():
            empty.append(i)
    if bad:
        rows = [i for i, _ in bad]
        raise ValueError(f"env.kwargs.prompt_column={column!r} of {path!r}: {len(bad)} row(s) hold no prompt, e.g. rows "
                         f"{rows[:10]} ({bad[0][1]})")
    if empty:
        raise ValueError(f"env.kwargs.prompt_column={column!r} of {path!r}: {len(empty)} of {len(cells)} rows have an "
                         f"empty prompt, rows {empty[:10]}{' ...' if len(empty) > 10 else ''}: remove them from the data")


class DatasetEnv:
    """See the module docstring. One instance runs one episode at a time."""

    text_format = TextFormat(tags=(), framed=False)

    def __init__(self, path: str | None = None, rewards: Sequence[str] = ("exact_match",),
                 reward_weights: Sequence[float] | None = None, prompt_column: str = "prompt",
                 answer_column: str = "answer", split: str = "train", config_name: str | None = None,
                 data_files: Sequence[str] | None = None, instruction: str = "", success_threshold: float = 1.0) -> None:
        if not path:
            raise ValueError("env=dataset needs env.kwargs.path: a hub dataset name, a local data file "
                             "(.jsonl/.json/.csv/.parquet) or a dataset directory")
        if isinstance(rewards, str):
            rewards = [rewards]
        self.rows = prompt_rows(str(path), split, config_name, tuple(data_files) if data_files else None, prompt_column)
        self.prompt_column = prompt_column
        needs_answer = [r for r in rewards if r in ANSWER_REWARDS]
        if needs_answer and answer_column not in self.rows.column_names:
            raise ValueError(f"env.kwargs.answer_column={answer_column!r} is not a column of {path!r} (columns: "
                             f"{self.rows.column_names}); the rewards {needs_answer} compare the answer with it")
        self.score = combine(list(rewards), reward_weights, answer_column)
        self.instruction = instruction
        self.success_threshold = float(success_threshold)
        self.index = -1
        self.row: dict[str, Any] = {}
        self.prompt = ""
        self.done = True

    def reset(self, seed: int) -> Observation:
        self.index = int(seed) % len(self.rows)
        self.row = self.rows[self.index]
        system, self.prompt = split_prompt(self.row[self.prompt_column], self.prompt_column)
        self.done = False
        return Observation(f"{system}\n\n{self.prompt}" if system else self.prompt, ("row", self.index))

    def legal_actions(self) -> list[str]:
        return []  # no answers to demonstrate: the format warm-up is skipped

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("the episode is over or was never started: call reset(seed) first")
        self.done = True
        total, parts = self.score(self.prompt, action, self.row)
        info = {"won": total >= self.success_threshold, "valid_action": bool(action.strip()), "rewards": parts}
        return StepResult(Observation(self.prompt, ("row", self.index)), total, True, info)

    def close(self) -> None:
        self.row = {}
