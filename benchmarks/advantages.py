"""Throughput of every advantage estimator, vectorized vs a per-group Python loop.

    python benchmarks/advantages.py [--sizes 10000 100000 1000000] [--loop-max 1000000] [--repeats 3]

Synthetic agent batches: groups of 8 episodes of 15 steps; the last step of an episode
is won with probability 0.3 (reward 1), 10% of steps are invalid (reward -0.1); anchors
follow a random walk on 16 states per task, so steps of one group revisit the same
states (realistic anchor repetition for GiGPO). The tree estimators get the same number
of rows as trees of 120 nodes (8 x 15), one tree per group, each node hanging from one of
the 4 nodes before it (so trees are about 40 levels deep and branch). Each estimator runs side by side with
its loop reference (``grpo_lab.advantages.reference``) on the same batch; the table
shows seconds (median of ``--repeats`` for the vectorized version, one run of the loop),
rows per second, the loop/vectorized ratio, and the largest difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grpo_lab.advantages import AdvantageInputs, run_estimator
from grpo_lab.advantages.reference import (
    copo_loop,
    focal_loop,
    gigpo_loop,
    grpo_loop,
    rloo_loop,
    tree_grpo_loop,
    treerpo_loop,
)

GROUP, LENGTH, STATES = 8, 15, 16


def make_batch(rows: int, seed: int = 0) -> AdvantageInputs:
    g = torch.Generator().manual_seed(seed)
    episodes = max(rows // LENGTH, GROUP)
    episodes -= episodes % GROUP
    n = episodes * LENGTH
    traj = torch.arange(episodes).repeat_interleave(LENGTH)
    group = traj // GROUP
    step = torch.arange(LENGTH).repeat(episodes)
    last = step == LENGTH - 1
    won = last & (torch.rand(n, generator=g) < 0.3)
    invalid = torch.rand(n, generator=g) < 0.1
    rewards = won.double() - 0.1 * invalid.double()
    # a random walk of +-1 on 16 states; every episode of a group starts from the same state
    moves = torch.randint(-1, 2, (episodes, LENGTH), generator=g)
    moves[:, 0] = 0
    start = torch.randint(0, STATES, (episodes // GROUP,), generator=g).repeat_interleave(GROUP)
    state = (start[:, None] + moves.cumsum(1)) % STATES
    anchor = (group * STATES + state.flatten()).long()
    # trees: one per group of 8 x 15 rows; node k hangs from one of nodes k-4 .. k-1
    node = torch.arange(n) % (GROUP * LENGTH)
    back = torch.minimum(torch.randint(1, 5, (n,), generator=g), node.clamp(min=1))
    parent = torch.where(node == 0, torch.full_like(node, -1), node - back)
    return AdvantageInputs(rewards=rewards, group_id=group, traj_id=traj, step=step, anchor_id=anchor, success=won,
                           tree_id=group, node_id=node, parent_id=parent)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--loop-max", type=int, default=1_000_000, help="skip the loop baseline above this many rows")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| estimator | rows | vectorized (s) | rows/s | loop (s) | loop / vectorized | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        inp = make_batch(size)
        n = inp.rewards.numel()
        cols = dict(
            rewards=inp.rewards.tolist(), group_id=inp.group_id.tolist(), traj_id=inp.traj_id.tolist(),
            step=inp.step.tolist(), anchors=inp.anchor_id.tolist(), success=inp.success.tolist(),
            node=inp.node_id.tolist(), parent=inp.parent_id.tolist(),
        )
        cases = {
            "grpo": (lambda: run_estimator(inp, "grpo"),
                     lambda: grpo_loop(cols["rewards"], cols["group_id"], cols["traj_id"])),
            "grpo (scale_rewards=none)": (lambda: run_estimator(inp, "grpo", {"scale_rewards": "none"}),
                                          lambda: grpo_loop(cols["rewards"], cols["group_id"], cols["traj_id"], "none")),
            "rloo": (lambda: run_estimator(inp, "rloo"),
                     lambda: rloo_loop(cols["rewards"], cols["group_id"], cols["traj_id"])),
            "gigpo": (lambda: run_estimator(inp, "gigpo"),
                      lambda: gigpo_loop(cols["rewards"], cols["group_id"], cols["traj_id"], cols["step"], cols["anchors"])),
            "copo": (lambda: run_estimator(inp, "copo"),
                     lambda: copo_loop(cols["rewards"], cols["group_id"], cols["traj_id"])[1]),
            "tree_grpo": (lambda: run_estimator(inp, "tree_grpo"),
                          lambda: tree_grpo_loop(cols["rewards"], cols["group_id"], cols["group_id"], cols["node"], cols["parent"])),
            "treerpo": (lambda: run_estimator(inp, "treerpo"),
                        lambda: treerpo_loop(cols["rewards"], cols["group_id"], cols["group_id"], cols["node"], cols["parent"])),
            "grpo + focal": (lambda: run_estimator(inp, "grpo", modifiers={"focal": {"gamma": 1.0}}),
                             lambda: focal_loop(grpo_loop(cols["rewards"], cols["group_id"], cols["traj_id"]),
                                                cols["group_id"], cols["traj_id"], cols["success"], 1.0)),
        }
        for name, (fast, slow) in cases.items():
            t_fast, out = timed(fast, args.repeats)
            result = out.extras["global_advantages"] if name == "copo" else out.advantages
            if n <= args.loop_max:
                t_slow, ref = timed(slow, 1)
                diff = float((result - torch.tensor(ref, dtype=result.dtype)).abs().max())
                loop_cols = f"{t_slow:.3f} | {t_slow / t_fast:.0f}x | {diff:.1e}"
            else:
                loop_cols = "- | - | -"
            print(f"| {name} | {n:,} | {t_fast:.4f} | {n / t_fast:,.0f} | {loop_cols} |", flush=True)


if __name__ == "__main__":
    main()
