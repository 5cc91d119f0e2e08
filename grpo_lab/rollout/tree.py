"""Tree sampling for Tree-GRPO and TreeRPO: branch new continuations from the middle of
earlier ones, so that paths share their prefixes and the sibling groups that the tree
estimators need come out of the rollout itself.

Tree-GRPO (Ji et al., 2025, "Tree Search for LLM Agent Reinforcement Learning"): for each
prompt, ``trees_per_prompt`` (M) trees each start as one complete chain; then ``rounds``
(L) expansion rounds each pick ``nodes_per_round`` (N) nodes of every tree at random
among its non-leaf nodes and its root (the prompt; ``expand_root``, as the official
Tree-GRPO includes the root among its expansion candidates) and, from each, sample one
new continuation to the end of the episode; its first node becomes a new child of the
picked node (a new top-level node, ``parent_id = -1``, when the root was picked). A node is one agent step
(``node="step"``: the answer of one turn and the environment's reply).

TreeRPO (Yang et al., 2025, "TreeRPO: Tree Relative Policy Optimization"): the same
procedure with nodes that are fixed segments of ``segment_tokens`` generated tokens
(``node="segment"``); a turn's answer then spans several nodes, and only the node that
completes the answer steps the environment.

Departures, stated:

- TreeRPO expands every node of a full tree of fixed depth and branching; here both
  granularities share Tree-GRPO's random expansion, so one budget knob (M, L, N) covers
  both and chain and tree runs can be compared at equal token and tool-call budgets.
- A continuation resumes the environment by replaying the path's actions on a fresh
  environment reset from the same seed (environments are deterministic in their seed,
  :class:`~grpo_lab.envs.base.Env`); replayed steps are counted apart from new tool calls
  and the replay is checked against the node's recorded state.
- A fault (the environment raised, hung or gave a non-finite reward; a prompt that
  cannot fit the context) drops the whole tree it happened in: its nodes' advantages
  depend on the leaves below them, which the failed branch would have added. The
  prompt keeps its other trees when they hold at least two leaves.

Every episode format (:mod:`~grpo_lab.rollout.formats`), through the same turn step as
the other loops (:func:`~grpo_lab.rollout.agent_loop.take_turn`): with conversation episodes a
node carries the conversation up to its child's prompt, so a branch continues its
ancestors' exact tokens and the tree's rows share them (the trie forward encodes them once).

Rows of the batch are nodes: ``tree_id`` (unique in the batch), ``node_id`` (unique in its
tree), ``parent_id`` (-1 for the first node of the initial chain), ``group_id`` (the
prompt), ``traj_id`` (the chain or continuation that generated the node: each leaf ends
exactly one, so trajectory metrics count leaves), ``step`` (the turn), ``done`` (the node
ends its episode: a leaf).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..data import RolloutBatch
from ..envs.base import Env, Observation, TextFormat, role_instructions_of, text_format_of
from .agent_loop import AgentLoopConfig, take_turn
from .episode import Row, act, close_env, env_name, rows_to_batch
from .backend import Backend
from .env_pool import EnvFault, guard
from .faults import FaultLog, drop_failed
from .prompts import PromptEncoder, Turn

NODE_KINDS = ("step", "segment")


@dataclass
class TreeSamplerConfig:
    """M trees per prompt, L expansion rounds of N nodes per tree; nodes are agent steps
    or segments of ``segment_tokens`` tokens."""

    trees_per_prompt: int = 2
    rounds: int = 1
    nodes_per_round: int = 2
    node: str = "step"
    segment_tokens: int = 8
    expand_root: bool = True  # the root (the prompt) is an expansion candidate too

    def __post_init__(self) -> None:
        for name in ("trees_per_prompt", "nodes_per_round", "segment_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.node not in NODE_KINDS:
            raise ValueError(f"tree node kind {self.node!r} is not one of {list(NODE_KINDS)}")

    def leaves_per_prompt(self) -> int:
        """Leaves per prompt when every tree has enough non-leaf nodes to expand."""
        return self.trees_per_prompt * (1 + self.rounds * self.nodes_per_round)


@dataclass
class TreeStats:
    """What a tree rollout spent: ``generated_tokens``; ``env_steps`` (new tool calls);
    ``replayed_env_steps`` (steps replayed to resume a continuation); ``nodes``;
    ``leaves``; ``generate_calls``; ``expansions_short``: picks that a tree could not
    make because it had fewer candidates (non-leaf nodes, and the root) than
    ``nodes_per_round``."""

    generated_tokens: int = 0
    env_steps: int = 0
    replayed_env_steps: int = 0
    nodes: int = 0
    leaves: int = 0
    generate_calls: int = 0
    expansions_short: int = 0


@dataclass
class _Node:
    """A node, and the episode's state right after it."""

    tree: int
    node: int
    parent: int
    group: int
    seed: int
    actions: tuple[str | None, ...]  # actions sent to the env along the path (None: no env call)
    history: tuple[Turn, ...]
    obs: Observation
    steps: int  # turns completed
    done: bool
    turn_prompt: tuple[int, ...] | None  # segment nodes inside an unfinished turn
    partial: tuple[int, ...]  # tokens of the unfinished turn so far
    conversation: tuple[int, ...] | None = None  # conversation episodes: the next turn's prompt (None at the root)


@dataclass
class _Branch:
    """A chain or continuation being generated."""

    branch: int
    state: _Node  # the node it continues from (a virtual root before the first node)
    env: Env
    nodes: list[_Node] = field(default_factory=list)


def _render(state: _Node, encoder: PromptEncoder, instruction: str, config: AgentLoopConfig, name: str,
            faults: FaultLog, fmt: TextFormat) -> tuple[list[int], list[int]]:
    """(the turn's prompt, the tokens already generated in it) for the next node; raises
    :class:`EnvFault` when the prompt cannot fit the context."""
    if state.turn_prompt is not None:
        return list(state.turn_prompt), list(state.partial)
    return config.episode_format.prompt(encoder, instruction, state.history, state.obs.text, state.conversation, config,
                                        (name, state.seed, state.steps), faults, fmt), []


def sample_trees(
    backend: Backend,
    encoder: PromptEncoder,
    env_factory: Callable[[], Env],
    seeds: Sequence[int],
    config: AgentLoopConfig,
    tree: TreeSamplerConfig,
    rng: random.Random,
    first_group_id: int = 0,
    faults: FaultLog | None = None,
) -> tuple[RolloutBatch, TreeStats]:
    """Sample ``tree.trees_per_prompt`` trees for each seed (prompt ``first_group_id + i``).

    ``config`` gives the turn limit, the history window and the sampling parameters
    (its ``group_size`` is not used: a prompt gets ``tree.leaves_per_prompt()`` leaves);
    ``rng`` picks the nodes to expand. Faults drop their tree (module docstring) and
    are counted in ``faults``; every branch counts as an episode."""
    forest = Forest(backend, encoder, env_factory, config, tree, faults if faults is not None else FaultLog(),
                    first_group_id)
    forest.grow(forest.plant(seeds))  # one chain per tree, from its root
    for _ in range(tree.rounds):
        forest.grow(forest.expansions(rng))
    return forest.batch()


class Forest:
    """The trees of one call to :func:`sample_trees`: their nodes, the rows they gave,
    the trees a fault dropped, and what the rollout spent."""

    def __init__(self, backend: Backend, encoder: PromptEncoder, env_factory: Callable[[], Env],
                 config: AgentLoopConfig, tree: TreeSamplerConfig, faults: FaultLog, first_group_id: int) -> None:
        self.backend, self.encoder, self.env_factory = backend, encoder, env_factory
        self.config, self.tree, self.faults, self.first_group_id = config, tree, faults, first_group_id
        self.stats = TreeStats()
        self.rows: list[Row] = []
        self.roots: dict[int, _Node] = {}  # tree -> its virtual root (node -1), holding the reset state
        self.nodes_of_tree: dict[int, list[_Node]] = {}
        self.next_node: dict[int, int] = {}  # tree -> the id its next node gets
        self.failed: dict[int, int] = {}  # tree -> group, of the trees a fault dropped
        self.branches = first_group_id * 10_000  # the last branch id given
        probe = guard(env_factory())
        self.instruction, self.name = probe.instruction, env_name(probe)
        roles = len(role_instructions_of(probe))
        close_env(probe)
        if roles > 1:
            raise ValueError(f"{self.name} has {roles} roles: trees branch one agent's turns (use a chain sampler)")

    def new_branch(self, state: _Node, env: Env) -> _Branch:
        self.branches += 1
        self.faults.episodes += 1
        return _Branch(self.branches, state, env)

    def tree_failed(self, tree_id: int, group: int, fault: EnvFault) -> None:
        self.faults.record(fault)
        self.failed[tree_id] = group

    def plant(self, seeds: Sequence[int]) -> list[_Branch]:
        """The trees' roots (a reset per tree) and the branch that starts each chain."""
        live: list[_Branch] = []
        tree_id = self.first_group_id * self.tree.trees_per_prompt
        for i, seed in enumerate(seeds):
            group = self.first_group_id + i
            for _ in range(self.tree.trees_per_prompt):
                env = guard(self.env_factory())
                self.nodes_of_tree[tree_id], self.next_node[tree_id] = [], 0
                try:
                    obs = env.reset(int(seed))
                except EnvFault as fault:
                    self.faults.episodes += 1
                    self.tree_failed(tree_id, group, fault)
                    close_env(env)
                    tree_id += 1
                    continue
                root = _Node(tree_id, -1, -1, group, int(seed), (), (), obs, 0, False, None, ())
                self.roots[tree_id] = root
                live.append(self.new_branch(root, env))
                tree_id += 1
        return live

    def expansions(self, rng: random.Random) -> list[_Branch]:
        """One expansion round: ``nodes_per_round`` nodes of every tree that has not
        failed, picked by ``rng`` among its non-leaf nodes (and its root with
        ``expand_root``), each continued by a new branch on a replayed environment."""
        tree, live = self.tree, []
        for tree_id, nodes in self.nodes_of_tree.items():
            if tree_id in self.failed:
                continue
            candidates = ([self.roots[tree_id]] if tree.expand_root else []) + [n for n in nodes if not n.done]
            picks = rng.sample(candidates, min(tree.nodes_per_round, len(candidates)))
            self.stats.expansions_short += tree.nodes_per_round - len(picks)
            for node in picks:
                if tree_id in self.failed:
                    break
                try:
                    env = _resume(self.env_factory, node, self.stats)
                except EnvFault as fault:
                    self.faults.episodes += 1
                    self.tree_failed(tree_id, node.group, fault)
                    break
                live.append(self.new_branch(node, env))
        return live

    def batch(self) -> tuple[RolloutBatch, TreeStats]:
        """The rows of the trees that did not fail, ordered by prompt, tree and node."""
        failed = {r.traj_id: r.group_id for r in self.rows if r.tree_id in self.failed}
        failed.update({-1 - t: g for t, g in self.failed.items()})  # trees that failed before their first node
        rows = drop_failed(self.rows, failed, self.faults)
        self.stats.nodes = len(rows)
        self.stats.leaves = sum(r.done for r in rows)
        return rows_to_batch(rows, order=lambda r: (r.group_id, r.tree_id, r.node_id)), self.stats

    def grow(self, live: list[_Branch]) -> None:
        """Generate every branch in ``live`` to the end of its episode, one node per
        branch per ``generate`` call; a branch whose tree failed stops."""
        while live:
            rendered, ready = [], []
            for b in live:
                if b.state.tree in self.failed:  # another branch of its tree failed
                    close_env(b.env)
                    continue
                try:
                    rendered.append(_render(b.state, self.encoder, self.instruction, self.config, self.name,
                                            self.faults, text_format_of(b.env)))
                    ready.append(b)
                except EnvFault as err:
                    self.tree_failed(b.state.tree, b.state.group, err)
                    close_env(b.env)
            live = ready
            if not live:
                break
            comps = self.backend.generate([p + q for p, q in rendered], self.sampling(live, rendered))
            self.stats.generate_calls += 1
            live = [b for b, (turn_prompt, partial), comp in zip(live, rendered, comps)
                    if self.add_node(b, turn_prompt, partial, comp)]

    def sampling(self, live: list[_Branch], rendered: list[tuple[list[int], list[int]]]) -> list:
        """Each branch's sampling parameters for its next node (a segment node stops
        after ``segment_tokens``)."""
        config, params = self.config, []
        for b, (prompt, partial) in zip(live, rendered):
            sp = config.params_for(b.branch, b.state.steps * 1000 + len(partial), len(prompt) + len(partial))
            if self.tree.node == "segment":
                sp = sp.with_max_tokens(min(self.tree.segment_tokens, config.sampling.max_tokens - len(partial),
                                            sp.max_tokens))
            params.append(sp)
        return params

    def add_node(self, b: _Branch, turn_prompt: list[int], partial: list[int], comp) -> bool:
        """The node that completion ``comp`` makes on branch ``b`` (a turn over steps
        the environment through the turn step); whether the branch goes on."""
        config, tokenizer, s = self.config, self.encoder.tokenizer, b.state
        max_tokens = config.sampling.max_tokens
        self.stats.generated_tokens += len(comp.token_ids)
        answer = partial + list(comp.token_ids)
        text = tokenizer.decode(answer, skip_special_tokens=True) if self.tree.node == "segment" else (
            comp.text or tokenizer.decode(comp.token_ids, skip_special_tokens=True))
        full = config.token_limit is not None and len(turn_prompt) + len(answer) >= config.token_limit
        stopped = any(stop in text for stop in text_format_of(b.env).stop)
        turn_over = (self.tree.node == "step" or comp.finish_reason == "stop" or stopped or len(answer) >= max_tokens
                     or full)
        node_id = self.next_node[s.tree]
        self.next_node[s.tree] += 1
        row = dict(group_id=s.group, traj_id=b.branch, step=s.steps, prompt_ids=turn_prompt + partial,
                   response_ids=list(comp.token_ids), logprobs=list(comp.logprobs), anchor=s.obs.anchor,
                   tree_id=s.tree, node_id=node_id, parent_id=s.node, version=comp.version)
        if not turn_over:  # a segment inside an answer: no action yet
            new = _Node(s.tree, node_id, s.node, s.group, s.seed, s.actions, s.history, s.obs, s.steps, False,
                        tuple(turn_prompt), tuple(answer), s.conversation)
            self.rows.append(Row(**row, reward=0.0, done=False, valid=True, won=False))
        else:
            try:
                action, result = act(b.env, text)
            except EnvFault as err:
                self.tree_failed(s.tree, s.group, err)
                close_env(b.env)
                return False
            self.stats.env_steps += result is not None
            turn = take_turn(s.obs, s.steps, turn_prompt, answer, (action, result), config, self.encoder, self.faults)
            conversation = tuple(turn.ids) if turn.ids is not None else None
            new = _Node(s.tree, node_id, s.node, s.group, s.seed, s.actions + (action,), s.history + (turn.turn,),
                        turn.obs, s.steps + 1, turn.done, None, (), conversation)
            self.rows.append(Row(**row, reward=turn.reward, done=turn.done, valid=turn.valid, won=turn.won,
                                 reward_parts=turn.parts, truncated=comp.finish_reason == "length" and not stopped))
        self.nodes_of_tree[s.tree].append(new)
        b.state = new
        if new.done:
            close_env(b.env)
        return not new.done


def _resume(env_factory: Callable[[], Env], node: _Node, stats: TreeStats) -> Env:
    """A fresh environment in the state right after ``node`` (reset and replay)."""
    env = guard(env_factory())
    try:
        obs = env.reset(node.seed)
        for action in node.actions:
            if action is not None:
                obs = env.step(action).observation
                stats.replayed_env_steps += 1
    except EnvFault:
        close_env(env)
        raise
    if obs.anchor != node.obs.anchor:
        raise RuntimeError(
            f"replaying {len(node.actions)} actions from seed {node.seed} reached state {obs.anchor!r}, not the node's "
            f"{node.obs.anchor!r}: tree sampling needs an environment that is deterministic in its seed"
        )
    return env
