"""Samplers: how one training step's episodes are drawn, behind a small registry.

A sampler takes the step's task seeds and returns their episodes as one
:class:`~grpo_lab.data.RolloutBatch`, writing what the rollout cost into
``ctx.stats`` (logged with the step). Three are built in:

- ``chain``: ``algo.group_size`` independent episodes per task, under the configured
  scheduler (full, micro groups, continuous refill);
- ``tree``: Tree-GRPO / TreeRPO trees (:mod:`grpo_lab.rollout.tree`);
- ``adaptive``: AR3PO's stages with response reuse (:mod:`grpo_lab.rollout.adaptive`);
- ``remax``: ``chain``'s episodes and one greedy episode per task, the baseline of
  ReMax (:mod:`grpo_lab.advantages.remax`), marked ``baseline_only``;
- ``r3``: ``chain``'s groups with R³'s replay, reflection and ranking reward
  (:mod:`grpo_lab.rollout.r3`).

Register another with ``@register_sampler("name")``; ``rollout.sampler=name`` selects it.

Group ids are global: under data parallelism each rank plays a contiguous slice of the
step's tasks, and :class:`GroupNumbering` numbers its groups as the single-process run
numbers the same tasks, so ids never collide across ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Protocol, Sequence

import torch

from ..data import RolloutBatch
from ..envs.base import Env
from ..registry import Registry
from .adaptive import ReuseBuffer, adaptive_rollout
from .r3 import TaskHistory, r3_rollout
from .agent_loop import AgentLoopConfig, run_episodes
from .backend import SamplingParams
from .env_pool import EnvFault
from .faults import FaultLog
from .prompts import PromptEncoder
from .scheduler import LengthPredictor, SchedulerConfig, run_scheduled
from .tree import sample_trees


@dataclass(frozen=True)
class GroupNumbering:
    """Group ids of one step: the step's ``tasks_per_step`` tasks (all ranks together)
    take consecutive ids, this rank's slice starting ``offset`` into them.

    ``first(stage, stages)``: the first id of this rank's groups in ``stage`` of a
    sampler that plays ``stages`` rounds of new groups per step (AR3PO)."""

    step: int
    tasks_per_step: int
    offset: int = 0

    def first(self, stage: int = 0, stages: int = 1) -> int:
        return (self.step * stages + stage) * self.tasks_per_step + self.offset


@dataclass
class RolloutContext:
    """What a sampler draws with: the engine, the prompt encoder, the environment
    factory, the loop settings, and the samplers' own state (which checkpoints save)."""

    backend: Any  # a grpo_lab.rollout.Backend
    encoder: PromptEncoder
    envs: Callable[[], Env]
    loop: AgentLoopConfig
    rollout: Any  # the RolloutConfig (sampler, tree, adaptive)
    scheduler: SchedulerConfig | None = None
    length_predictor: LengthPredictor = field(default_factory=LengthPredictor)
    reuse_buffer: ReuseBuffer | None = None
    history: TaskHistory | None = None  # sampler=r3: the past episodes of each task
    tree_rng: random.Random = field(default_factory=random.Random)
    faults: FaultLog = field(default_factory=FaultLog)
    stats: dict[str, float] = field(default_factory=dict)
    episodes: "EpisodePlayer | None" = None  # plays whole episodes in place of the turn loop (agents' functions)

    def play(self, seeds: list[int], group_size: int, first_group_id: int,
             sampling: SamplingParams | None = None) -> RolloutBatch:
        """``group_size`` episodes from each seed, under the configured scheduler (or
        by the episode player); ``sampling``: other sampling settings than the loop's."""
        if self.episodes is not None:
            if sampling is not None:
                raise ValueError("episodes played by an agent's own code sample as its requests say: no other "
                                 "sampling settings can be imposed on them")
            batch, stats = self.episodes(seeds, group_size, first_group_id, self.faults)
            for key, value in stats.items():
                self.stats[key] = self.stats.get(key, 0) + value
            return batch
        loop = replace(self.loop, group_size=group_size, sampling=sampling or self.loop.sampling)
        if self.scheduler is None:
            return run_episodes(self.backend, self.encoder, self.envs, seeds, loop, first_group_id=first_group_id,
                                faults=self.faults)
        batch, st = run_scheduled(self.backend.stream(), self.encoder, self.envs, seeds, loop, self.scheduler,
                                  first_group_id=first_group_id, predictor=self.length_predictor, faults=self.faults)
        for key, value in (("rollout_engine_steps", st.stream.engine_steps), ("rollout_decode_steps", st.stream.decode_steps),
                           ("rollout_env_seconds", st.env_seconds)):
            self.stats[key] = self.stats.get(key, 0) + value
        self.stats["rollout_peak_inflight_tokens"] = max(self.stats.get("rollout_peak_inflight_tokens", 0),
                                                         st.stream.peak_inflight_tokens)
        return batch

    def initial_anchor(self, seed: int) -> Hashable:
        """The anchor of ``seed``'s initial state; a failing reset gives a key of its own
        (its episodes fail in the rollout and are counted there)."""
        env = self.envs()
        try:
            return env.reset(seed).anchor
        except EnvFault:
            return ("reset failed", seed)
        finally:
            env.close()


class EpisodePlayer(Protocol):
    """Whole episodes from elsewhere than the turn loop (a user's agent function behind
    the endpoint: :class:`grpo_lab.endpoint.agents.AgentPlayer`)."""

    def __call__(self, seeds: Sequence[int], group_size: int, first_group_id: int, faults: FaultLog
                 ) -> tuple[RolloutBatch, dict[str, float]]:
        """``group_size`` episodes from each seed (group ids from ``first_group_id``), the
        failed ones counted in ``faults`` and dropped; and what the rollout cost."""
        ...


#: ``sampler(ctx, seeds, numbering) -> RolloutBatch``
Sampler = Callable[[RolloutContext, list[int], GroupNumbering], RolloutBatch]
#: samplers by ``rollout.sampler``
SAMPLERS: Registry[Sampler] = Registry("samplers", "rollout.sampler", "sampler", options=lambda fn: ())


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    """Register ``fn`` as ``rollout.sampler=name``; a name taken twice raises."""
    return SAMPLERS.register(name)


def sampler_names() -> list[str]:
    return SAMPLERS.names()


def get_sampler(name: str) -> Sampler:
    """The sampler registered as ``name``; ``KeyError`` listing the valid names otherwise."""
    return SAMPLERS.get(name)


@register_sampler("chain")
def chain_sampler(ctx: RolloutContext, seeds: list[int], ids: GroupNumbering) -> RolloutBatch:
    """``loop.group_size`` independent episodes from each seed."""
    batch = ctx.play(seeds, ctx.loop.group_size, ids.first())
    ctx.stats["responses_per_prompt"] = float(ctx.loop.group_size)
    return batch


@register_sampler("tree")
def tree_sampler(ctx: RolloutContext, seeds: list[int], ids: GroupNumbering) -> RolloutBatch:
    """Tree-GRPO / TreeRPO trees (``rollout.tree``) from each seed."""
    batch, st = sample_trees(ctx.backend, ctx.encoder, ctx.envs, seeds, ctx.loop, ctx.rollout.tree, ctx.tree_rng,
                             first_group_id=ids.first(), faults=ctx.faults)
    ctx.stats.update({"responses_per_prompt": st.leaves / max(len(seeds), 1), "rollout_env_steps": st.env_steps,
                      "rollout_replayed_env_steps": st.replayed_env_steps, "tree_nodes": st.nodes,
                      "tree_expansions_short": st.expansions_short})
    return batch


@register_sampler("adaptive")
def adaptive_sampler(ctx: RolloutContext, seeds: list[int], ids: GroupNumbering) -> RolloutBatch:
    """AR3PO's stages (``rollout.adaptive``), with the reuse buffer when enabled."""
    ac = ctx.rollout.adaptive
    keys = [ctx.initial_anchor(seed) for seed in seeds]

    def play(stage_seeds, n, stage):
        first = ids.first(stage, ac.stages)
        return ctx.play(stage_seeds, n, first), first

    batch, st = adaptive_rollout(play, seeds, keys, ac, ctx.reuse_buffer if ac.reuse else None, first_group_id=ids.first())
    ctx.stats.update({"responses_per_prompt": st.responses_per_prompt, "ar3po_stages_run": st.stages_run,
                      "ar3po_reused": st.reused, "ar3po_unsolved": st.unsolved,
                      "ar3po_buffer_size": len(ctx.reuse_buffer) if ctx.reuse_buffer is not None else 0})
    return batch


@register_sampler("remax")
def remax_sampler(ctx: RolloutContext, seeds: list[int], ids: GroupNumbering) -> RolloutBatch:
    """``loop.group_size`` sampled episodes from each seed, and one greedy episode (ReMax's baseline)."""
    size, first = ctx.loop.group_size, ids.first()
    sampled = ctx.play(seeds, size, first)
    greedy = ctx.play(seeds, 1, first, sampling=replace(ctx.loop.sampling, temperature=0.0, seed=None))
    # episode ids as in groups of size + 1: member j of group g is g * (size + 1) + j, the greedy one j = size
    sampled = replace(sampled, traj_id=sampled.traj_id + sampled.traj_id // size)
    greedy = replace(greedy, traj_id=greedy.group_id * (size + 1) + size,
                     baseline_only=torch.ones(len(greedy), dtype=torch.bool))
    ctx.stats["responses_per_prompt"] = float(size)
    ctx.stats["remax_greedy_episodes"] = float(len(torch.unique(greedy.traj_id)))
    return RolloutBatch.concat([sampled, greedy]) if len(greedy) else sampled


@register_sampler("r3")
def r3_sampler(ctx: RolloutContext, seeds: list[int], ids: GroupNumbering) -> RolloutBatch:
    """``chain``'s groups with R³'s reflection, ranking reward and cross-context replay (``rollout.r3``)."""
    if ctx.history is None:
        raise ValueError("rollout.sampler=r3 needs the run's task history (RolloutContext.history)")
    size = ctx.loop.group_size

    def play(envs: Callable[[], Env]) -> RolloutBatch:
        return replace(ctx, envs=envs).play(seeds, size, ids.first())

    batch, metrics = r3_rollout(play, ctx.envs, ctx.history, ctx.rollout.r3, size, ctx.encoder.tokenizer)
    ctx.stats.update(metrics)
    ctx.stats["responses_per_prompt"] = float(size)
    return batch
