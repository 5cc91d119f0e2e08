"""What a run's episodes say about the policy: the metrics of a step's batch, the
evaluation on held-out seeds (success rate, return, pass@k), the fault-rate limit both
obey, and the warning for steps that trained nothing."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from .advantages.grouping import trajectory_table
from .data import RolloutBatch
from .rollout import AgentLoopConfig, run_episodes
from .rollout.env_pool import EnvRunner
from .rollout.episode import ENV_METRIC_PREFIX
from .rollout.faults import FaultLog
from .rollout.prompts import PromptEncoder
from .rollout.samplers import EpisodePlayer
from .training import distributed as dp
from .training.pass_at_k import pass_at_k, pass_at_k_ks, success_counts
from .training.stop import EnvFaultRateExceeded

log = logging.getLogger("grpo_lab")

#: consecutive steps without a learning signal after which the run warns
NO_SIGNAL_WARN_AFTER = 3


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """A non-empty step batch's episodes: return, success, length, invalid actions, rows
    and tokens, the share of groups whose episodes all ended alike (all won or all not:
    no outcome signal, ``groups_all_alike``), the mean of each named reward part
    (``reward/<name>``) and each figure the environment reports, per episode
    (``env/<name>``, :func:`env_figures`). The
    episode figures are those of the step's own episodes (a replayed one,
    ``batch.replayed``, is left out); rows and tokens count every row that trains."""
    rows, tokens = len(batch), batch.num_response_tokens()
    if bool(batch.replayed.any()):
        batch = batch.select(torch.nonzero(~batch.replayed).flatten())
    success = batch.trajectory_success().float()  # [E]
    trajs, per_traj = torch.unique(batch.traj_id, return_counts=True)  # [E]
    traj_group = torch.zeros_like(trajs).scatter_(0, torch.searchsorted(trajs, batch.traj_id), batch.group_id)  # [E]
    groups, group_of = torch.unique(traj_group, return_inverse=True)  # [K], [E]
    won = torch.zeros(len(groups)).index_add_(0, group_of, success)  # [K]
    size = torch.zeros(len(groups)).index_add_(0, group_of, torch.ones_like(success))  # [K]
    return {
        "groups_all_alike": float(((won == 0) | (won == size)).float().mean()),
        "reward_mean": float(batch.trajectory_returns().mean()),
        "success_rate": float(success.mean()),
        "episode_length": float(per_traj.float().mean()),
        "episodes": int(per_traj.numel()),
        "invalid_action_rate": float((~batch.valid_action).float().mean()),
        "env_steps": int(batch.valid_action.sum()),  # actions the environment carried out (tool calls)
        "num_rows": rows,
        "response_tokens": tokens,
        **{f"reward/{name}": mean for name, mean in batch.reward_part_means().items()
           if not name.startswith(ENV_METRIC_PREFIX)},
        **env_figures(batch, int(per_traj.numel())),
    }


def env_figures(batch: RolloutBatch, episodes: int) -> dict[str, float]:
    """``env/<name>``: each figure the environment reported on its steps
    (``info["metrics"]``), summed over the batch's rows, per episode (a count per
    episode: searches, refines; a step the environment never saw reports nothing)."""
    sums: dict[str, float] = {}
    for parts in batch.reward_parts:
        for name, value in parts.items():
            if name.startswith(ENV_METRIC_PREFIX):
                sums[name] = sums.get(name, 0.0) + value
    return {name: total / max(episodes, 1) for name, total in sums.items()}


def check_fault_rate(dist: dp.DistContext, faults: FaultLog, limit: float, phase: str, evaluation: bool = False) -> None:
    """Stop (:class:`EnvFaultRateExceeded`) when ``phase`` (a step's rollout, or an
    ``evaluation``) lost more than ``limit`` (``rollout.max_env_fault_rate``) of its
    episodes, counted over every rank."""
    episodes, dropped = dp.global_sums(dist, [faults.episodes, faults.episodes_dropped])
    if episodes == 0 or dropped / episodes <= limit:
        return
    counts = ", ".join(f"{k}={v}" for k, v in faults.metrics().items() if v and k != "episodes_dropped")
    examples = "\n".join(f"  {line}" for line in faults.examples)
    judged = ("the success rate of the episodes that happened to run would not be the policy's" if evaluation
              else "training on the episodes that happened to run would bias the batch")
    raise EnvFaultRateExceeded(
        f"{phase}: {int(dropped)} of {int(episodes)} episodes failed ({'this rank: ' if dist.enabled else ''}"
        f"{counts}), more than rollout.max_env_fault_rate={limit:g}; {judged}. First faults:\n{examples}\n"
        "Fix the environment (or raise rollout.max_env_fault_rate), then resume")


def evaluate(backend, encoder: PromptEncoder, envs: EnvRunner, loop: AgentLoopConfig, seeds: list[int], samples: int,
             dist: dp.DistContext, max_fault_rate: float, player: EpisodePlayer | None = None) -> dict[str, float]:
    """Success rate, mean return, invalid-action rate and episode length over ``samples``
    sampled episodes from each evaluation seed (over the ``episodes`` that did not fail;
    ``episodes_dropped`` counts the others), and with more than one sample per seed,
    ``pass@k`` (:mod:`grpo_lab.training.pass_at_k`). Each rank plays its share of
    ``seeds``; the figures are over all. An evaluation that loses more than
    ``max_fault_rate`` of its episodes stops the run (:class:`EnvFaultRateExceeded`), as
    a rollout does. ``player`` plays the episodes when the environment plays its own
    (``env=agent``); else the lock-step turn loop does."""
    if not seeds:
        return {}
    faults = FaultLog()
    mine = seeds[dist.rank::dist.world_size]
    try:
        if player is not None:
            batch, _ = player(mine, samples, 0, faults)
        else:
            config = replace(loop, group_size=samples, request_seed=None)
            batch = run_episodes(backend, encoder, envs, mine, config, faults=faults)
    finally:
        envs.clear()
    check_fault_rate(dist, faults, max_fault_rate, f"evaluation ({len(seeds)} tasks x {samples} samples)",
                     evaluation=True)
    won = batch.trajectory_success()  # [E] (an empty batch, every episode failed, gives empty columns)
    ks = pass_at_k_ks(samples) if samples > 1 else []
    per_k = []
    if ks:
        _, task, _ = trajectory_table(batch.reward, batch.traj_id, batch.group_id)  # [E], in won's episode order
        counts, correct = success_counts(task, won)  # [tasks] each
        for k in ks:  # a task that lost episodes to faults counts for the k it still has
            keep = counts >= k  # [tasks]
            per_k += [float(pass_at_k(counts[keep], correct[keep], k).sum()), float(keep.sum())]
    success, returns, episodes, invalid, rows, dropped, *sums = dp.global_sums(dist, [
        float(won.sum()), float(batch.trajectory_returns().sum()), float(won.numel()),
        float((~batch.valid_action).sum()), float(len(batch)), float(faults.episodes_dropped), *per_k])
    if episodes == 0:  # every episode failed, under rollout.max_env_fault_rate=1
        nan = float("nan")
        log.warning("evaluation: all %d episodes failed; no success rate", int(dropped))
        return {"success_rate": nan, "reward_mean": nan, "invalid_action_rate": nan, "episode_length": nan,
                "episodes": 0, "episodes_dropped": int(dropped)}
    out = {"success_rate": success / episodes, "reward_mean": returns / episodes, "invalid_action_rate": invalid / rows,
           "episode_length": rows / episodes, "episodes": int(episodes), "episodes_dropped": int(dropped)}
    for k, total, tasks in zip(ks, sums[0::2], sums[1::2]):
        out[f"pass@{k}"] = total / tasks if tasks else float("nan")
    return out


def eval_basis(result: dict[str, Any]) -> str:
    """What an evaluation's figures rest on: ``(over 60 of 64 eval episodes; 4 failed)``."""
    episodes, dropped = int(result.get("episodes", 0)), int(result.get("episodes_dropped", 0))
    failed = f"; {dropped} failed" if dropped else ""
    return f"(over {episodes} of {episodes + dropped} eval episodes{failed})"


def no_signal_warning(records: list[dict[str, Any]]) -> str:
    """The warning for consecutive step ``records`` in which every group's advantages
    were zero, with the likely cause read from their success rates."""
    steps = f"steps {records[0]['step']}-{records[-1]['step']}"
    success = [r.get("success_rate") for r in records if r.get("success_rate") is not None]
    if success and max(success) == 0:
        cause = ("no episode succeeds and every episode of a task gets the same reward: the task is too hard for the "
                 "policy, or its answers are never in the format the environment parses (a format warm-up, "
                 "trainer.warmup.steps, an easier task or a larger algo.group_size may help)")
    elif success and min(success) == 1:
        cause = "every episode succeeds with the same reward: the task is too easy for the policy (use a harder one)"
    else:
        cause = ("the reward does not tell the episodes of a task apart (a constant or coarse reward function, or "
                 "too few episodes per task: algo.group_size)")
    return (f"{steps}: every group's advantages were zero, so these {len(records)} steps trained nothing. "
            f"Likely cause: {cause}")
