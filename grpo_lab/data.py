"""``RolloutBatch``: the one type every package speaks.

One row per generated response: an agent step in a multi-turn episode, or a whole
answer in a single-turn task. Scalar columns are ``[N]`` tensors; token columns are
lists of ``N`` one-dimensional tensors of per-row length (prompts and responses are
ragged, and padding is a concern of whoever batches them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Hashable, Sequence

import torch
from torch import Tensor

_SCALAR_COLUMNS = ("group_id", "traj_id", "step", "role", "invocation", "reward", "done", "valid_action", "won", "tree_id", "node_id", "parent_id",
                   "off_policy", "policy_version", "truncated", "baseline_only", "advantage_scale", "replayed",
                   "reward_shaping")
_TOKEN_COLUMNS = ("prompt_ids", "response_ids", "rollout_logprobs", "loss_mask")


#: the scalar columns a batch may leave out: their dtype and the value they are filled with
_OPTIONAL_COLUMNS: dict[str, tuple[torch.dtype, Any]] = {
    "won": (torch.bool, False), "off_policy": (torch.bool, False), "truncated": (torch.bool, False),
    "baseline_only": (torch.bool, False), "replayed": (torch.bool, False),
    "tree_id": (torch.long, -1), "node_id": (torch.long, -1), "parent_id": (torch.long, -1),
    "policy_version": (torch.long, -1), "role": (torch.long, 0), "invocation": (torch.long, -1),
    "advantage_scale": (torch.float32, 1.0), "reward_shaping": (torch.float32, 0.0),
}


def _long(values: Sequence[int] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.long)


@dataclass
class RolloutBatch:
    """Flat rows of generated responses.

    Columns (``N`` rows):

    - ``group_id`` ``[N]``: rows whose episodes started from the same task and seed.
    - ``traj_id`` ``[N]``: the episode (trajectory) a row belongs to; unique across groups.
    - ``step`` ``[N]``: the turn index inside its episode, from 0.
    - ``prompt_ids``, ``response_ids``: token ids, ``N`` tensors of shape ``[P_i]``, ``[R_i]``.
    - ``rollout_logprobs``: ``N`` tensors ``[R_i]``, log-probs the sampler gave the response.
    - ``loss_mask``: ``N`` tensors ``[R_i]``, 1 on tokens the policy generated, 0 on tokens
      inside a response that came from elsewhere (tool or observation text).
    - ``reward`` ``[N]``: the environment's reward for this step (raw, unshaped).
    - ``done`` ``[N]``: the episode ended after this step (terminated or truncated).
    - ``valid_action`` ``[N]``: the answer parsed and the action was legal.
    - ``won`` ``[N]``: the episode was won at this step (success is ``won`` on its last row).
    - ``anchor``: ``N`` hashable keys of the state the step acted from.
    - ``tree_id``, ``node_id``, ``parent_id`` ``[N]``: tree-sampling bookkeeping, -1 for chains.
    - ``off_policy`` ``[N]``: the row was sampled by an earlier policy than this step's
      (AR3PO's reused episodes); its ``rollout_logprobs`` are that policy's, and the loss
      weighs it by ``pi_old / pi_behaviour`` (truncated).
    - ``policy_version`` ``[N]``: the version of the weights that sampled the row's
      response (the number of RL steps applied to them; an engine in its own process
      reports it with each completion), -1 where the backend does not report one (a
      backend in the trainer's process: the current weights). A row's sampled tokens come
      from one completion, which a weight push can split (``rollout.partial_rollout=
      continue``): the row then has the oldest of its tokens' versions.
    - ``truncated`` ``[N]``: the response stopped at the token budget (the sampler's
      ``finish_reason == "length"``), not at an end of its own.
    - ``baseline_only`` ``[N]``: the row's episode is a baseline that scores and does not
      train (ReMax's greedy episode of each task); it leaves the batch after the advantages.
    - ``replayed`` ``[N]``: the row's episode was played at an earlier step and joined
      this one's group (R³'s replay); it trains, and the step's episode metrics leave it out.
    - ``role`` ``[N]``: the acting agent of a multi-agent episode, an index into the run's
      roles (0: the main agent; every row of a single-agent run).
    - ``invocation`` ``[N]``: a sub-agent row's invocation within its episode and role
      (0, 1, ...; rows of one invocation share it), -1 on the main agent's rows.
    - ``reward_shaping`` ``[N]`` float: what the algorithm adds to the row's reward before
      the advantages (0; R³'s ranking reward, minus the KL penalty of KL in the reward);
      ``reward`` stays the environment's, and the step's metrics report it.
    - ``advantage_scale`` ``[N]`` float: a factor on the row's advantage after the
      estimator and its modifiers (1; R³'s ``alpha`` on replayed episodes).
    - ``reward_parts``: ``N`` dicts, the named parts of each step's reward where the
      environment reports them (several reward functions), else empty; for logging.
    """

    group_id: Tensor
    traj_id: Tensor
    step: Tensor
    prompt_ids: list[Tensor]
    response_ids: list[Tensor]
    rollout_logprobs: list[Tensor]
    loss_mask: list[Tensor]
    reward: Tensor
    done: Tensor
    valid_action: Tensor
    anchor: list[Hashable]
    won: Tensor | None = None
    tree_id: Tensor | None = None
    node_id: Tensor | None = None
    parent_id: Tensor | None = None
    off_policy: Tensor | None = None
    policy_version: Tensor | None = None
    reward_parts: list[dict[str, float]] | None = None
    truncated: Tensor | None = None
    baseline_only: Tensor | None = None
    advantage_scale: Tensor | None = None
    replayed: Tensor | None = None
    reward_shaping: Tensor | None = None
    role: Tensor | None = None
    invocation: Tensor | None = None

    def __setstate__(self, state: dict) -> None:
        """Batches pickled before a column of :data:`_OPTIONAL_COLUMNS` (or ``reward_parts``)
        existed load with its default."""
        self.__dict__.update(state)
        n = len(self.prompt_ids)
        for name, (dtype, fill) in _OPTIONAL_COLUMNS.items():
            if name not in state:
                setattr(self, name, torch.full((n,), fill, dtype=dtype))
        if "reward_parts" not in state:
            self.reward_parts = [{} for _ in self.prompt_ids]

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        for name in ("group_id", "traj_id", "step"):
            value = getattr(self, name)
            setattr(self, name, _long(value) if value is not None else torch.full((n,), -1, dtype=torch.long))
        self.reward = torch.as_tensor(self.reward, dtype=torch.float32)
        for name in ("done", "valid_action"):
            value = getattr(self, name)
            setattr(self, name, torch.as_tensor(value, dtype=torch.bool) if value is not None else torch.zeros(n, dtype=torch.bool))
        for name, (dtype, fill) in _OPTIONAL_COLUMNS.items():
            value = getattr(self, name)
            setattr(self, name, torch.as_tensor(value, dtype=dtype) if value is not None else torch.full((n,), fill, dtype=dtype))
        self.prompt_ids = [_long(p) for p in self.prompt_ids]
        self.response_ids = [_long(r) for r in self.response_ids]
        self.rollout_logprobs = [torch.as_tensor(lp, dtype=torch.float32) for lp in self.rollout_logprobs]
        self.loss_mask = [torch.as_tensor(m, dtype=torch.float32) for m in self.loss_mask]
        self.anchor = list(self.anchor)
        self.reward_parts = [dict(p) for p in self.reward_parts] if self.reward_parts is not None else [{} for _ in range(n)]
        self.validate()

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first column whose shape disagrees."""
        n = len(self)
        for name in _SCALAR_COLUMNS:
            value = getattr(self, name)
            if value.dim() != 1 or value.shape[0] != n:
                raise ValueError(f"column {name!r} has shape {tuple(value.shape)}, expected ({n},)")
        for name in _TOKEN_COLUMNS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name!r} has {len(getattr(self, name))} rows, expected {n}")
        for name in ("anchor", "reward_parts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name!r} has {len(getattr(self, name))} rows, expected {n}")
        for i, (resp, lp, mask) in enumerate(zip(self.response_ids, self.rollout_logprobs, self.loss_mask)):
            if not (resp.shape == lp.shape == mask.shape) or resp.dim() != 1:
                raise ValueError(
                    f"row {i}: response_ids {tuple(resp.shape)}, rollout_logprobs {tuple(lp.shape)} and "
                    f"loss_mask {tuple(mask.shape)} must be equal one-dimensional shapes"
                )
        if not torch.isfinite(self.reward_shaping).all():
            raise ValueError("reward_shaping has non-finite values")
        if not torch.isfinite(self.reward).all():
            bad = torch.nonzero(~torch.isfinite(self.reward)).flatten().tolist()[:5]
            raise ValueError(f"reward has non-finite values at rows {bad}")

    def select(self, index: Sequence[int] | Tensor) -> "RolloutBatch":
        """The rows at ``index``, in that order."""
        idx = _long(index)
        picked = idx.tolist()
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value[idx] if isinstance(value, Tensor) else [value[i] for i in picked]
        return RolloutBatch(**kwargs)

    @staticmethod
    def concat(batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """Rows of all ``batches`` in order (ids are kept as they are)."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        kwargs = {}
        for f in fields(RolloutBatch):
            values = [getattr(b, f.name) for b in batches]
            kwargs[f.name] = torch.cat(values) if isinstance(values[0], Tensor) else [x for v in values for x in v]
        return RolloutBatch(**kwargs)

    def reward_part_means(self) -> dict[str, float]:
        """``{name: mean}`` of each named reward part over the rows that report it."""
        sums: dict[str, list[float]] = {}
        for parts in self.reward_parts:
            for name, value in parts.items():
                sums.setdefault(name, []).append(value)
        return {name: sum(v) / len(v) for name, v in sums.items()}

    def without_loss_on(self, rows: Tensor) -> "RolloutBatch":
        """A copy whose ``loss_mask`` is 0 on every token of the ``rows`` (``[N]`` bool):
        they stay in the batch (their rewards count in their groups) and train nothing."""
        rows = torch.as_tensor(rows, dtype=torch.bool)
        if rows.shape != (len(self),):
            raise ValueError(f"rows has shape {tuple(rows.shape)}, expected ({len(self)},)")
        masks = [torch.zeros_like(m) if r else m for m, r in zip(self.loss_mask, rows.tolist())]
        return RolloutBatch(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "loss_mask": masks})

    def num_response_tokens(self) -> int:
        return int(sum(int(m.sum()) for m in self.loss_mask))

    def trajectory_success(self) -> Tensor:
        """``[num_trajectories]`` bool: whether each episode was won (in ``traj_id`` order)."""
        _, inverse = torch.unique(self.traj_id, return_inverse=True)
        won = torch.zeros(int(inverse.max()) + 1 if len(self) else 0, dtype=torch.float32)
        won.scatter_reduce_(0, inverse, self.won.float(), reduce="amax")
        return won.bool()

    def trajectory_returns(self) -> Tensor:
        """``[num_trajectories]``: the sum of raw rewards of each episode (in ``traj_id`` order)."""
        _, inverse = torch.unique(self.traj_id, return_inverse=True)
        returns = torch.zeros(int(inverse.max()) + 1 if len(self) else 0, dtype=torch.float32)
        return returns.index_add_(0, inverse, self.reward)


def hashable_anchor(anchor: Any) -> Hashable:
    """An exact, hashable key of an anchor: text and other hashables as they are; arrays
    and tensors by dtype, shape and bytes; dicts by their sorted items; lists and tuples
    element by element (recursively)."""
    if isinstance(anchor, (str, bytes, int, float, bool, type(None))):
        return anchor
    if isinstance(anchor, Tensor):
        t = anchor.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.numpy().tobytes())
    if type(anchor).__module__ == "numpy" and hasattr(anchor, "tobytes"):
        return ("ndarray", str(anchor.dtype), tuple(anchor.shape), anchor.tobytes())
    if isinstance(anchor, dict):
        return ("dict", tuple(sorted((repr(k), hashable_anchor(v)) for k, v in anchor.items())))
    if isinstance(anchor, (list, tuple)):
        return (type(anchor).__name__, tuple(hashable_anchor(a) for a in anchor))
    if isinstance(anchor, (set, frozenset)):
        return ("set", tuple(sorted(repr(hashable_anchor(a)) for a in anchor)))
    try:
        hash(anchor)
    except TypeError:
        raise TypeError(f"anchor of type {type(anchor).__name__} cannot be hashed exactly: {anchor!r:.80}") from None
    return anchor


def anchor_ids(anchors: Sequence[Any]) -> Tensor:
    """``[N]`` dense integer ids such that two rows get the same id iff their anchors are
    exactly equal (see :func:`hashable_anchor`)."""
    table: dict[Hashable, int] = {}
    return torch.tensor([table.setdefault(hashable_anchor(a), len(table)) for a in anchors], dtype=torch.long)


__all__ = ["RolloutBatch", "anchor_ids"]
