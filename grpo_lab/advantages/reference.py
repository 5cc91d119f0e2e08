"""Plain per-group Python loops that compute the same advantages as the vectorized
estimators. They are the references the tests compare against and the baseline the
benchmark times; nothing else should call them."""

from __future__ import annotations

import difflib
import math
import statistics
from collections import defaultdict
from typing import Hashable, Sequence


def _normalise(values: list[float], mode: str, eps: float) -> list[float]:
    if len(values) < 2 or max(values) == min(values):
        return [0.0] * len(values)
    mean = sum(values) / len(values)
    if mode == "mean_norm":
        return [v - mean for v in values]
    std = statistics.stdev(values)
    return [(v - mean) / (std + eps) for v in values]


def _normalise_weighted(values: list[float], weights: list[float], units: float, mode: str, eps: float) -> list[float]:
    """Each value weighted; ``units`` is what the weights add up to (the std's sample size)."""
    if units <= 1 or max(values) == min(values):
        return [0.0] * len(values)
    mean = sum(w * v for w, v in zip(weights, values)) / units
    if mode == "mean_norm":
        return [v - mean for v in values]
    std = math.sqrt(sum(w * (v - mean) ** 2 for w, v in zip(weights, values)) / (units - 1))
    if std + eps == 0:
        return [0.0] * len(values)
    return [(v - mean) / (std + eps) for v in values]


def _row_scores(rewards, group_id, traj_id, penalty):
    """Per row: its episode's return minus its own penalty, and ``1 / episode length``;
    the rows of each group; the episodes of each group."""
    n = len(rewards)
    penalty = penalty if penalty is not None else [0.0] * n
    returns: dict[int, float] = defaultdict(float)
    length: dict[int, int] = defaultdict(int)
    for r, t in zip(rewards, traj_id):
        returns[t] += r
        length[t] += 1
    rows_of_group: dict[int, list[int]] = defaultdict(list)
    trajs_of_group: dict[int, set] = defaultdict(set)
    for i in range(n):
        rows_of_group[group_id[i]].append(i)
        trajs_of_group[group_id[i]].add(traj_id[i])
    score = [returns[traj_id[i]] - penalty[i] for i in range(n)]
    weight = [1.0 / length[traj_id[i]] for i in range(n)]
    return score, weight, rows_of_group, trajs_of_group


def _episodes(rewards, group_id, traj_id):
    returns: dict[int, float] = defaultdict(float)
    group_of: dict[int, int] = {}
    for r, g, t in zip(rewards, group_id, traj_id):
        returns[t] += r
        group_of[t] = g
    by_group: dict[int, list[int]] = defaultdict(list)
    for t in returns:
        by_group[group_of[t]].append(t)
    return returns, by_group


def grpo_loop(rewards, group_id, traj_id, scale_rewards="group", eps=1e-6, penalty=None) -> list[float]:
    score, weight, rows_of_group, trajs_of_group = _row_scores(rewards, group_id, traj_id, penalty)
    everyone = list(range(len(rewards)))
    total = sum(len(t) for t in trajs_of_group.values())
    batch_std = 0.0
    if total > 1:
        batch_mean = sum(weight[i] * score[i] for i in everyone) / total
        batch_std = math.sqrt(sum(weight[i] * (score[i] - batch_mean) ** 2 for i in everyone) / (total - 1))
    adv = [0.0] * len(rewards)
    for g, rows in rows_of_group.items():
        units = len(trajs_of_group[g])
        values = [score[i] for i in rows]
        if units <= 1 or max(values) == min(values):
            continue
        if scale_rewards == "group":
            out = _normalise_weighted(values, [weight[i] for i in rows], units, "mean_std_norm", eps)
        else:
            centered = _normalise_weighted(values, [weight[i] for i in rows], units, "mean_norm", eps)
            out = [c / (batch_std + eps) for c in centered] if scale_rewards == "batch" else centered
        for i, v in zip(rows, out):
            adv[i] = v
    return adv


def rloo_loop(rewards, group_id, traj_id, penalty=None) -> list[float]:
    score, weight, rows_of_group, trajs_of_group = _row_scores(rewards, group_id, traj_id, penalty)
    mean_score: dict[int, float] = defaultdict(float)  # each episode's mean row score
    for i, t in enumerate(traj_id):
        mean_score[t] += weight[i] * score[i]
    adv = [0.0] * len(rewards)
    for g, rows in rows_of_group.items():
        trajs = trajs_of_group[g]
        if len(trajs) < 2 or max(score[i] for i in rows) == min(score[i] for i in rows):
            continue
        for i in rows:
            others = [mean_score[u] for u in trajs if u != traj_id[i]]
            adv[i] = score[i] - sum(others) / len(others)
    return adv


def gigpo_loop(
    rewards, group_id, traj_id, step, anchors: Sequence[Hashable], gamma=0.95, step_weight=1.0, mode="mean_norm",
    episode_stats="trajectory", similarity_threshold=1.0, eps=1e-6, penalty=None,
) -> list[float]:
    n = len(rewards)
    penalty = penalty if penalty is not None else [0.0] * n
    score, weight, rows_of_group, trajs_of_group = _row_scores(rewards, group_id, traj_id, penalty)
    rows_of_traj: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        rows_of_traj[traj_id[i]].append(i)
    episode_adv = [0.0] * n
    for g, rows in rows_of_group.items():
        if episode_stats == "trajectory":
            out = _normalise_weighted([score[i] for i in rows], [weight[i] for i in rows], len(trajs_of_group[g]), mode, eps)
        else:
            out = _normalise_weighted([score[i] for i in rows], [1.0] * len(rows), len(rows), mode, eps)
        for i, v in zip(rows, out):
            episode_adv[i] = v
    # discounted step returns, episode by episode
    step_return = [0.0] * n
    for rows in rows_of_traj.values():
        running = 0.0
        for i in sorted(rows, key=lambda i: step[i], reverse=True):
            running = rewards[i] + gamma * running
            step_return[i] = running - penalty[i]
    # step groups: equal anchors inside one episode group, then (single linkage) similar ones
    step_adv = [0.0] * n
    for g, rows in rows_of_group.items():
        members: dict[Hashable, list[int]] = defaultdict(list)
        for i in rows:
            members[anchors[i]].append(i)
        distinct = list(members)
        label = list(range(len(distinct)))
        if similarity_threshold < 1.0:
            for a in range(len(distinct)):
                for b in range(a):
                    if label[a] != label[b] and difflib.SequenceMatcher(
                        None, str(distinct[a]), str(distinct[b])
                    ).ratio() >= similarity_threshold:
                        old_label, new_label = label[a], label[b]
                        label = [new_label if x == old_label else x for x in label]
        clusters: dict[int, list[int]] = defaultdict(list)
        for k, anchor in enumerate(distinct):
            clusters[label[k]].extend(members[anchor])
        for cluster in clusters.values():
            for i, v in zip(cluster, _normalise([step_return[i] for i in cluster], mode, eps)):
                step_adv[i] = v
    return [episode_adv[i] + step_weight * step_adv[i] for i in range(n)]


def focal_loop(advantages, group_id, traj_id, success, gamma=1.0) -> list[float]:
    won: dict[int, bool] = defaultdict(bool)
    group_of: dict[int, int] = {}
    for g, t, s in zip(group_id, traj_id, success):
        won[t] = won[t] or bool(s)
        group_of[t] = g
    rate: dict[int, list[bool]] = defaultdict(list)
    for t, w in won.items():
        rate[group_of[t]].append(w)
    scale = {g: (1 - sum(ws) / len(ws)) ** gamma for g, ws in rate.items()}
    return [a * scale[g] for a, g in zip(advantages, group_id)]


def _tree_walk(rewards, tree_id, node_id, parent_id):
    """Row index of each (tree, node); children lists; path returns; leaves below each row."""
    n = len(rewards)
    where = {(tree_id[i], node_id[i]): i for i in range(n)}
    parent = [where[(tree_id[i], parent_id[i])] if parent_id[i] >= 0 else -1 for i in range(n)]
    children: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        if parent[i] >= 0:
            children[parent[i]].append(i)

    def path_return(i: int) -> float:
        return rewards[i] + (path_return(parent[i]) if parent[i] >= 0 else 0.0)

    def leaves_below(i: int) -> list[int]:
        return [i] if not children[i] else [leaf for c in children[i] for leaf in leaves_below(c)]

    returns = [path_return(i) for i in range(n)]
    return parent, children, returns, [leaves_below(i) for i in range(n)]


def tree_grpo_loop(rewards, group_id, tree_id, node_id, parent_id, mode="mean_std_norm", node_reduce="sum", eps=1e-6) -> list[float]:
    n = len(rewards)
    _, children, returns, below = _tree_walk(rewards, tree_id, node_id, parent_id)
    leaves = [i for i in range(n) if not children[i]]
    leaf_adv = {i: 0.0 for i in leaves}
    for key in (group_id, tree_id):
        members: dict[int, list[int]] = defaultdict(list)
        for i in leaves:
            members[key[i]].append(i)
        for rows in members.values():
            for i, v in zip(rows, _normalise([returns[i] for i in rows], mode, eps)):
                leaf_adv[i] += v
    div = (lambda i: len(below[i])) if node_reduce == "mean" else (lambda i: 1)
    return [sum(leaf_adv[j] for j in below[i]) / div(i) for i in range(n)]


def treerpo_loop(rewards, group_id, tree_id, node_id, parent_id, mode="mean_std_norm", eps=1e-6, penalty=None) -> list[float]:
    n = len(rewards)
    penalty = penalty if penalty is not None else [0.0] * n
    _, _, returns, below = _tree_walk(rewards, tree_id, node_id, parent_id)
    value = [sum(returns[j] for j in below[i]) / len(below[i]) - penalty[i] for i in range(n)]
    siblings: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n):  # the prompt's children are siblings across its trees
        siblings[("prompt", group_id[i]) if parent_id[i] < 0 else ("tree", tree_id[i], parent_id[i])].append(i)
    adv = [0.0] * n
    for rows in siblings.values():
        for i, v in zip(rows, _normalise([value[i] for i in rows], mode, eps)):
            adv[i] = v
    return adv


def copo_loop(rewards, group_id, traj_id, b=0.5, k=1.0, entropy_coef=True, blend="soft_forced", eps=1e-6, penalty=None):
    """Returns (local advantages, global advantages, local weights), one entry per row."""
    local = grpo_loop(rewards, group_id, traj_id, "group", eps, penalty)
    returns, by_group = _episodes(rewards, group_id, traj_id)
    if penalty is not None:  # each episode's score: its return minus the mean penalty of its rows
        paid: dict[int, list[float]] = defaultdict(list)
        for t, p in zip(traj_id, penalty):
            paid[t].append(p)
        returns = {t: r - sum(paid[t]) / len(paid[t]) for t, r in returns.items()}
    global_reward, weight = {}, {}
    for g, trajs in by_group.items():
        values = [returns[t] for t in trajs]
        n = len(values)
        probs = [values.count(v) / n for v in set(values)]
        entropy = -sum(p * math.log2(p) for p in probs)
        lam = (1 - 1 / n) / math.log2(n) if n > 1 else 0.0
        mean = sum(values) / n
        global_reward[g] = mean * (1 - lam * entropy) if entropy_coef else mean
        weight[g] = 1 / (1 + math.exp(-k * (entropy - b)))
    values = list(global_reward.values())
    if len(values) > 1 and max(values) != min(values):
        mean, std = sum(values) / len(values), statistics.stdev(values)
        global_adv = {g: (v - mean) / (std + eps) for g, v in global_reward.items()}
    else:
        global_adv = {g: 0.0 for g in global_reward}
    weights = [weight[g] if blend == "soft" or a != 0 else 0.0 for g, a in zip(group_id, local)]
    return local, [global_adv[g] for g in group_id], weights


# ---------------------------------------------------------------- the estimators verl ships
def _token_whiten(values: list[float], lengths: list[float], eps: float = 1e-8) -> list[float]:
    """verl's ``masked_whiten`` with each value repeated over its ``lengths`` tokens."""
    tokens = [v for v, n in zip(values, lengths) for _ in range(int(n))]
    if not tokens:
        return [0.0] * len(values)
    mean = sum(tokens) / len(tokens)
    var = sum((t - mean) ** 2 for t in tokens) / (len(tokens) - 1) if len(tokens) > 1 else 0.0
    return [(v - mean) / math.sqrt(var + eps) for v in values]


def single_turn_groups(rewards, group_id) -> dict[int, list[int]]:
    """The rows of each group, one row per episode (single-turn batches)."""
    rows: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_id):
        rows[g].append(i)
    return rows


def reinforce_pp_loop(rewards, lengths) -> list[float]:
    """Single-turn REINFORCE++ (gamma 1): the rewards whitened over every token."""
    return _token_whiten(list(rewards), lengths)


def reinforce_pp_baseline_loop(rewards, group_id, lengths) -> list[float]:
    """Single-turn REINFORCE++-baseline: reward minus its group's mean (0 alone), whitened."""
    centred = [0.0] * len(rewards)
    for rows in single_turn_groups(rewards, group_id).values():
        if len(rows) > 1:
            mean = sum(rewards[i] for i in rows) / len(rows)
            for i in rows:
                centred[i] = rewards[i] - mean
    return _token_whiten(centred, lengths)


def opo_loop(rewards, group_id, lengths) -> list[float]:
    adv = [0.0] * len(rewards)
    for rows in single_turn_groups(rewards, group_id).values():
        if len(rows) < 2 or max(rewards[i] for i in rows) == min(rewards[i] for i in rows):
            continue
        baseline = sum(lengths[i] * rewards[i] for i in rows) / sum(lengths[i] for i in rows)
        for i in rows:
            adv[i] = rewards[i] - baseline
    return adv


def gpg_loop(rewards, group_id, f_norm=1.0) -> list[float]:
    alpha = len(rewards) / max(sum(1 for r in rewards if r != 0), 1)
    adv = [0.0] * len(rewards)
    for rows in single_turn_groups(rewards, group_id).values():
        if len(rows) < 2 or max(rewards[i] for i in rows) == min(rewards[i] for i in rows):
            continue
        mean = sum(rewards[i] for i in rows) / len(rows)
        for i in rows:
            adv[i] = alpha * (rewards[i] - mean) / f_norm
    return adv


def passk_loop(rewards, group_id, norm_adv_by_std=True, eps=1e-6) -> list[float]:
    adv = [0.0] * len(rewards)
    for rows in single_turn_groups(rewards, group_id).values():
        values = [rewards[i] for i in rows]
        if len(rows) < 2 or max(values) == min(values):
            continue
        best = max(range(len(rows)), key=lambda k: (values[k], -k))  # the first of equal bests
        second = max(v for k, v in enumerate(values) if k != best)
        margin = values[best] - second
        if norm_adv_by_std:
            margin /= statistics.stdev(values) + eps
        adv[rows[best]] = margin
    return adv
