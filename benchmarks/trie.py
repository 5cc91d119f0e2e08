"""Update cost of the trie-packed forward against the per-row and the one-level forwards.

    python benchmarks/trie.py [--workload conversation tree] [--group 4] [--turns 10]
                              [--prompt 200] [--answer 32] [--observation 64]
                              [--config tiny|real|qwen2.5-1.5b] [--device cpu|cuda] [--dtype float32]
                              [--attention reference triton] [--repeats 3]

Workloads, shaped as the rollout makes them (random token ids):

- ``conversation``: a group of ``--group`` conversation episodes of ``--turns`` turns from
  one first prompt of ``--prompt`` tokens; each turn answers ``--answer`` tokens and the
  environment replies ``--observation`` tokens. One row per turn: its prompt is the whole
  conversation before its answer (``rollout.episode_format=conversation``).
- ``tree``: Tree-GRPO on conversation turns: 2 trees from the same first prompt, each one
  chain of ``--turns`` turns, then ``--group`` branches, each from a random node of its tree
  and continued to ``--turns`` turns. One row per node.

Every row of a workload goes through one forward and backward of the response
log-probs (one micro-batch) with ``response_logprobs`` (``plain``: every row encodes its
whole prompt), ``shared_prefix_logprobs`` (``group``: the group's common prompt prefix
once, Prefix Grouper) and ``trie_logprobs`` for each attention backend (``trie-reference``,
``trie-triton``). The table gives the tokens each encodes, the ideal ratio (row tokens /
distinct trie tokens), the median time and (CUDA) peak memory of each, and the measured
speedups of the trie.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo_lab.training.forward import response_logprobs
from grpo_lab.training.shared_prefix import common_prefix_length, enable_shared_prefix, shared_prefix_logprobs
from grpo_lab.training.trie import build_trie, trie_logprobs
from shared_prefix import CONFIGS, measure  # benchmarks/shared_prefix.py: model sizes, timing


def conversation_rows(gen: random.Random, vocab: int, group: int, turns: int, prompt: int, answer: int, obs: int):
    """Rows (prompt, response) of ``group`` conversation episodes from one first prompt."""
    first = [gen.randrange(vocab) for _ in range(prompt)]
    rows = []
    for _ in range(group):
        ctx = list(first)
        for _ in range(turns):
            ans = [gen.randrange(vocab) for _ in range(answer)]
            rows.append((list(ctx), ans))
            ctx += ans + [gen.randrange(vocab) for _ in range(obs)]
    return rows


def tree_rows(gen: random.Random, vocab: int, branches: int, turns: int, prompt: int, answer: int, obs: int):
    """Rows of 2 trees of turns: a chain each, then ``branches`` continuations from random nodes."""
    first = [gen.randrange(vocab) for _ in range(prompt)]
    rows = []
    for _ in range(2):
        nodes = []  # (context before the node's answer, depth)

        def grow(ctx, depth):
            while depth < turns:
                ans = [gen.randrange(vocab) for _ in range(answer)]
                rows.append((list(ctx), ans))
                nodes.append((list(ctx), depth))
                ctx = ctx + ans + [gen.randrange(vocab) for _ in range(obs)]
                depth += 1

        grow(list(first), 0)
        for _ in range(branches):
            ctx, depth = gen.choice(nodes)
            grow(ctx, depth)  # a new answer at that node: a sibling
    return rows


def step(model, method, prompts, responses) -> None:
    model.zero_grad(set_to_none=True)
    if method == "plain":
        logp, mask, _ = response_logprobs(model, prompts, responses)
    elif method == "group":
        logp, mask, _ = shared_prefix_logprobs(model, prompts, responses, [list(range(len(prompts)))])
    else:
        logp, mask, _ = trie_logprobs(model, prompts, responses, attention=method.split("-")[1])
    (logp * mask).sum().backward()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", nargs="+", default=["conversation", "tree"], choices=["conversation", "tree"])
    parser.add_argument("--group", type=int, nargs="+", default=[4])
    parser.add_argument("--turns", type=int, nargs="+", default=[10])
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--observation", type=int, default=64)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", nargs="+", default=["reference"], choices=["reference", "triton"])
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if "triton" in args.attention and device.type != "cuda":
        raise SystemExit("--attention triton needs --device cuda")
    config = AutoConfig.for_model("qwen2", **CONFIGS[args.config])
    torch.manual_seed(0)
    with device:
        model = enable_shared_prefix(AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)))
    methods = ["plain", "group", *(f"trie-{a}" for a in args.attention)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; config: {args.config}; dtype: {args.dtype}; first prompt "
          f"{args.prompt}, answers {args.answer}, observations {args.observation} tokens; time = forward + backward "
          "of the response log-probs of every row (one micro-batch)")
    print("| workload | G | turns | rows | tokens plain | tokens group | tokens trie | ideal (plain/trie) | "
          + " | ".join(f"{m} (s)" for m in methods) + " | " + " | ".join(f"peak MiB {m}" for m in methods)
          + " | trie vs plain | trie vs group |")
    print("|---|" + "---:|" * (9 + 2 * len(methods)))
    for workload in args.workload:
        for g in args.group:
            for turns in args.turns:
                gen = random.Random(0)
                make = conversation_rows if workload == "conversation" else tree_rows
                rows = make(gen, config.vocab_size, g, turns, args.prompt, args.answer, args.observation)
                prompts = [torch.tensor(p) for p, _ in rows]
                responses = [torch.tensor(r) for _, r in rows]
                plain = sum(p.numel() + r.numel() for p, r in zip(prompts, responses))
                shared = common_prefix_length(prompts)
                group = shared + sum(p.numel() - shared + r.numel() for p, r in zip(prompts, responses))
                trie = build_trie([torch.cat([p, r]) for p, r in zip(prompts, responses)]).layout.length
                results = [measure(lambda: step(model, m, prompts, responses), model, args.repeats, device)
                           for m in methods]
                times = [t for t, _ in results]
                cells = [f"{t:.3f}" if t is not None else "OOM" for t in times] + [peak for _, peak in results]
                best = times[-1]
                ratio = [f"{times[k] / best:.2f}x" if times[k] is not None and best is not None else "-" for k in (0, 1)]
                print(f"| {workload} | {g} | {turns} | {len(rows)} | {plain} | {group} | {trie} | {plain / trie:.2f}x | "
                      + " | ".join(cells) + f" | {ratio[0]} | {ratio[1]} |", flush=True)


if __name__ == "__main__":
    main()
