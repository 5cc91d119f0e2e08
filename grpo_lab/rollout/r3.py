"""R³: cross-context replay, in-context reflection and an entropy ranking reward.

Jiang et al. 2026, "R³: Replay, Reflection, and Ranking Rewards for LLM Reinforcement
Learning" (arXiv:2601.19620). A group whose episodes all end alike (all failed, or all
solved) gives GRPO no signal; R³ gives it one three ways, each here in one function and
all three played by ``rollout.sampler=r3`` (:func:`r3_rollout`):

- **Replay** (the paper's cross-context replay): a per-task history of past episodes
  (:class:`TaskHistory`: tokens, reward, the behaviour log-probs and policy version,
  ``capacity`` per task, ``max_tasks`` tasks, kept in checkpoints). When a group's new
  episodes all failed, up to ``replay_k`` past *solved* episodes of the same task join
  it (all solved: past failed ones), so the group has both outcomes
  (:func:`replay_into_groups`). They are trained as the rows an earlier policy sampled
  already are (``off_policy``: the decoupled ratio with the truncated weight
  ``min(pi_old / pi_behaviour, algo.off_policy_is_cap)``), and their advantages are
  multiplied by ``alpha`` (``RolloutBatch.advantage_scale``).
- **Reflection** (in-context self-reflection): a task whose last ``reflection_window``
  stored episodes have a mean return below ``reflection_threshold`` is shown its most
  recent failed attempts (at most ``reflection_attempts``, each cut to
  ``reflection_tokens`` tokens) above its first observation (:class:`ReflectingEnv`); the
  episode is trained with the prompt it was played with.
- **Ranking reward** (the structural entropy ranking reward): within a group, the episodes
  that did not succeed (failed or truncated) are ranked by their token-entropy pattern
  and get graded rewards in ``[0, rank_reward]`` in place of all-equal ones
  (:func:`entropy_rank_rewards`).

What the paper leaves unspecified, or what its public text does not give, is our choice,
stated: the history is keyed by the task's initial state (its first observation's
anchor, as AR3PO's buffer); replay triggers on outcomes (``won``), not on reward ties;
``alpha = 0.5``, ``replay_k = 2``, ``capacity = 8`` (RePO's buffer size); the reflection
note's wording (:data:`REFLECTION_HEADER`) and its trigger; the ranking score is
``mean_t h_t + std_t h_t`` of the episode's per-token surprisal ``h_t = -log pi(o_t)``
(the sampled token's, whose expectation is the token's entropy: engines report the
sampled token's log-prob, not the whole distribution), lower ranks higher (stable and
confident over the whole answer, and locally steady), and the ``n`` unsuccessful
episodes of a group get ``c (n - 1 - rank) / (n - 1)`` on their last row (``c =
rank_reward = 0.1``, below any success reward of 1; a lone one gets 0). Replayed
episodes keep the reward they were stored with. Under data parallelism each process
keeps the history of the tasks it played.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable, Sequence

import torch

from ..data import RolloutBatch
from ..envs.base import Env, Observation
from .env_pool import GuardedEnv, guard

#: the line above a reflected task's past attempts
REFLECTION_HEADER = "Earlier attempts at this task that did not succeed:"
REFLECTION_FOOTER = "Do not repeat their mistakes."


@dataclass
class R3Config:
    """``rollout.r3``: R³'s settings (the module docstring says which are the paper's)."""

    replay_k: int = 2  # past episodes of the other outcome that join a group without one (0: no replay)
    alpha: float = 0.5  # the factor on a replayed episode's advantages
    capacity: int = 8  # episodes kept per task
    max_tasks: int = 100_000  # tasks kept; the least recently played one leaves first
    reflection_threshold: float | None = 0.2  # mean return below which a task reflects; null: no reflection
    reflection_window: int = 4  # the stored episodes that mean is over
    reflection_attempts: int = 2  # failed attempts shown
    reflection_tokens: int = 96  # tokens of each attempt shown
    rank_reward: float = 0.1  # c, the best unsuccessful episode's reward in a group (0: no ranking reward)

    def __post_init__(self) -> None:
        for name in ("replay_k", "reflection_attempts", "reflection_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"rollout.r3.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("capacity", "max_tasks", "reflection_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.r3.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.alpha:
            raise ValueError(f"rollout.r3.alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.rank_reward < 1:
            raise ValueError(f"rollout.r3.rank_reward must be in [0, 1) (below a success's reward), got {self.rank_reward}")


@dataclass
class StoredEpisode:
    """One past episode of a task: its rows (tokens, rewards, the behaviour log-probs and
    policy versions as sampled), its return, whether it succeeded, and its answer's text."""

    rows: RolloutBatch
    ret: float
    won: bool
    text: str


class TaskHistory:
    """The most recent ``capacity`` episodes of each task, for at most ``max_tasks``
    tasks (the least recently played leaves first); pickled into checkpoints."""

    def __init__(self, capacity: int, max_tasks: int) -> None:
        self.capacity, self.max_tasks = capacity, max_tasks
        self._tasks: OrderedDict[Hashable, deque[StoredEpisode]] = OrderedDict()

    def add(self, key: Hashable, episode: StoredEpisode) -> None:
        stored = self._tasks.pop(key, None) or deque(maxlen=self.capacity)
        stored.append(episode)
        self._tasks[key] = stored  # the most recently played task is last
        while len(self._tasks) > self.max_tasks:
            self._tasks.popitem(last=False)

    def past(self, key: Hashable, won: bool, k: int) -> list[StoredEpisode]:
        """The ``k`` most recent stored episodes of ``key`` with outcome ``won``."""
        found = [e for e in reversed(self._tasks.get(key, ())) if e.won == won]
        return found[:k]

    def recent_mean_return(self, key: Hashable, window: int) -> float | None:
        stored = list(self._tasks.get(key, ()))[-window:]
        return sum(e.ret for e in stored) / len(stored) if stored else None

    def resized(self, capacity: int, max_tasks: int) -> "TaskHistory":
        """A history with these bounds holding what this one holds (the oldest episodes
        and tasks leave first where the bounds are smaller); the stored episodes are
        shared, since none is changed once stored."""
        out = TaskHistory(capacity, max_tasks)
        for key, stored in self._tasks.items():
            out._tasks[key] = deque(stored, maxlen=capacity)
        while len(out._tasks) > max_tasks:
            out._tasks.popitem(last=False)
        return out

    def __deepcopy__(self, memo: dict) -> "TaskHistory":
        """A snapshot (the sampler's state is copied after every step): the structure is
        copied, the stored episodes shared, so a copy costs pointers, not tensors."""
        return self.resized(self.capacity, self.max_tasks)

    def __len__(self) -> int:
        return sum(len(v) for v in self._tasks.values())

    @property
    def tasks(self) -> int:
        return len(self._tasks)


def episode_slices(batch: RolloutBatch) -> list[list[int]]:
    """The row indices of each episode, in order of first appearance."""
    order: dict[int, list[int]] = {}
    for i, traj in enumerate(batch.traj_id.tolist()):
        order.setdefault(traj, []).append(i)
    return list(order.values())


def task_key(batch: RolloutBatch, rows: Sequence[int]) -> Hashable:
    """An episode's task: the anchor of its first row (the initial state)."""
    first = min(rows, key=lambda i: int(batch.step[i]))
    return batch.anchor[first]


def surprisal_score(batch: RolloutBatch, rows: Sequence[int]) -> float:
    """``mean_t h_t + std_t h_t`` of ``h_t = -log pi(o_t)`` over the episode's sampled
    tokens (0 without any)."""
    h = torch.cat([-batch.rollout_logprobs[i][batch.loss_mask[i] > 0] for i in rows]).double()  # [T_e]
    if h.numel() == 0:
        return 0.0
    return float(h.mean() + (h.std(unbiased=False) if h.numel() > 1 else 0.0))


def entropy_rank_rewards(batch: RolloutBatch, c: float) -> tuple[RolloutBatch, dict[str, float]]:
    """``batch`` with each group's unsuccessful episodes graded by rank (module
    docstring): the ``n`` of a group, ranked by :func:`surprisal_score` ascending, add
    ``c (n - 1 - rank) / (n - 1)`` to their last row's ``reward_shaping`` (ties keep
    episode order; ``reward`` stays the environment's)."""
    if c == 0 or not len(batch):
        return batch, {}
    episodes = episode_slices(batch)
    by_group: dict[int, list[list[int]]] = {}
    for rows in episodes:
        if not bool(batch.won[rows].any()) and not bool(batch.baseline_only[rows].any()):
            by_group.setdefault(int(batch.group_id[rows[0]]), []).append(rows)
    bonus = torch.zeros(len(batch), dtype=torch.float32)  # [N]
    for failed in by_group.values():
        n = len(failed)
        if n < 2:
            continue
        scores = [surprisal_score(batch, rows) for rows in failed]
        ranked = sorted(range(n), key=lambda j: scores[j])
        for rank, j in enumerate(ranked):
            last = max(failed[j], key=lambda i: int(batch.step[i]))
            bonus[last] = c * (n - 1 - rank) / (n - 1)
    graded = int((bonus > 0).sum())
    return replace(batch, reward_shaping=batch.reward_shaping + bonus), {"r3_ranked_episodes": float(graded),
                                                          "r3_rank_reward_mean": float(bonus[bonus > 0].mean()) if graded else 0.0}


def replay_into_groups(batch: RolloutBatch, history: TaskHistory, k: int, alpha: float, group_size: int
                       ) -> tuple[RolloutBatch, dict[str, float]]:
    """``batch`` with, for each group whose episodes all failed (all succeeded), up to
    ``k`` past succeeded (failed) episodes of its task from ``history``: relabelled into
    the group (episode ids ``g (group_size + k) + group_size + j``; the new ones'
    ``g (group_size + k) + m``), ``off_policy``, ``advantage_scale = alpha``.

    Returns the batch and ``r3_groups_replayed`` and ``r3_replayed_episodes`` (the share
    of groups whose episodes all ended alike is the step's ``groups_all_alike``)."""
    if not len(batch):
        return batch, {}
    width = group_size + k
    fresh = replace(batch, traj_id=(batch.traj_id // group_size) * width + batch.traj_id % group_size)
    groups: dict[int, list[list[int]]] = {}
    for rows in episode_slices(fresh):
        groups.setdefault(int(fresh.group_id[rows[0]]), []).append(rows)
    parts, replayed_groups, replayed = [fresh], 0, 0
    for g, episodes in groups.items():
        outcomes = {bool(fresh.won[rows].any()) for rows in episodes}
        if len(outcomes) != 1:
            continue
        past = history.past(task_key(fresh, episodes[0]), not outcomes.pop(), k) if k else []
        for j, stored in enumerate(past):
            rows = stored.rows
            parts.append(replace(rows, group_id=torch.full_like(rows.group_id, g),
                                 traj_id=torch.full_like(rows.traj_id, g * width + group_size + j),
                                 off_policy=torch.ones_like(rows.off_policy), replayed=torch.ones_like(rows.replayed),
                                 advantage_scale=torch.full_like(rows.advantage_scale, alpha)))
        replayed_groups += bool(past)
        replayed += len(past)
    metrics = {"r3_groups_replayed": float(replayed_groups), "r3_replayed_episodes": float(replayed)}
    return (RolloutBatch.concat(parts) if len(parts) > 1 else fresh), metrics


def remember(batch: RolloutBatch, history: TaskHistory, decode: Callable[[list[int]], str]) -> None:
    """Store every episode of ``batch`` (the step's new ones; a baseline episode is
    left out) in ``history`` under its task, with its raw return and answer text."""
    for rows in episode_slices(batch):
        if bool(batch.baseline_only[rows].any()):
            continue
        episode = batch.select(rows)
        text = decode([t for i in range(len(episode)) for t in episode.response_ids[i].tolist()])
        history.add(task_key(batch, rows), StoredEpisode(episode, float(episode.reward.sum()),
                                                         bool(episode.won.any()), text))


def reflection_note(history: TaskHistory, key: Hashable, config: R3Config,
                    truncate: Callable[[str, int], str]) -> str:
    """The text a reflecting task's first observation gains ('' when the task does not
    reflect): its recent failed attempts, each cut to ``config.reflection_tokens``."""
    if config.reflection_threshold is None or config.reflection_attempts == 0:
        return ""
    mean = history.recent_mean_return(key, config.reflection_window)
    if mean is None or mean >= config.reflection_threshold:
        return ""
    failed = history.past(key, False, config.reflection_attempts)
    if not failed:
        return ""
    lines = [f"- {truncate(e.text, config.reflection_tokens).strip()}" for e in failed]
    return "\n".join([REFLECTION_HEADER, *lines, REFLECTION_FOOTER]) + "\n\n"


class ReflectingEnv(GuardedEnv):
    """An environment whose first observation of a reflecting task carries the note of
    :func:`reflection_note` (``note(anchor)``); its state, anchors and rewards are the
    wrapped environment's. ``reflected`` counts the episodes that got a note."""

    def __init__(self, env: Env, note: Callable[[Hashable], str], counter: list[int]) -> None:
        inner = guard(env)
        super().__init__(inner, getattr(inner, "name", type(inner).__name__))
        self._note, self._counter = note, counter

    def reset(self, seed: int) -> Observation:
        self.seed, self.steps = seed, 0
        obs = self._env.reset(seed)  # a guarded environment: its faults are EnvFaults already
        note = self._note(obs.anchor)
        if not note:
            return obs
        self._counter[0] += 1
        return Observation(note + obs.text, obs.anchor)

    def step(self, action: str):
        self.steps += 1
        return self._env.step(action)

    def legal_actions(self) -> list[str]:
        return self._env.legal_actions()


def r3_rollout(play: Callable[[Callable[[], Env]], RolloutBatch], envs: Callable[[], Env], history: TaskHistory,
               config: R3Config, group_size: int, tokenizer: Any) -> tuple[RolloutBatch, dict[str, float]]:
    """One step's groups the R³ way: ``play(env_factory)`` plays them with reflecting
    environments; the unsuccessful episodes are ranked; groups whose episodes all ended
    alike take replayed past episodes; the new episodes join the history (after the
    replay, so a group never replays itself)."""
    counter = [0]

    def truncate(text: str, tokens: int) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids, skip_special_tokens=True)

    def note(anchor: Hashable) -> str:
        return reflection_note(history, anchor, config, truncate)

    batch = play(lambda: ReflectingEnv(envs(), note, counter))
    raw = batch
    batch, metrics = entropy_rank_rewards(batch, config.rank_reward)
    batch, replay_metrics = replay_into_groups(batch, history, config.replay_k, config.alpha, group_size)
    metrics.update(replay_metrics)
    remember(raw, history, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    metrics.update({"r3_reflected_episodes": float(counter[0]), "r3_history_tasks": float(history.tasks)})
    return batch, metrics
