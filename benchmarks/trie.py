"""Update cost of the trie-packed forward against the per-row and the one-level forwards.

    python benchmarks/trie.py [--workload conversation tree] [--group 4] [--turns 10]
                              [--prompt 200] [--answer 32] [--observation 64]
                              [--config tiny|real|qwen2.5-1.5b] [--device cpu|cuda] [--dtype float32]
                              [--attention reference triton] [--repeats 3]
    python benchmarks/trie.py --sweep [--sweep-prompts 10 30 100 300 1000 2000] [--sweep-answers 32 256]
                              [--sweep-groups 4 16] [--rows 64] [--config tiny] [--repeats 3]

``--sweep``: single-turn groups, as the default packing meets them: one micro-batch of
``--rows`` rows (``--rows / G`` groups of ``G`` answers of ``R`` tokens to one prompt of
``P`` tokens each), for every ``P``, ``R`` and ``G``; forward and backward with no packing
(``plain``), Prefix Grouper (``group``), the trie and ``auto`` (the default,
``trainer.packing=auto``: the trie or plain per micro-batch by its cost model), as
times and as ratios to plain, with what ``auto`` chose. The default must never be more
than 5% slower than plain.

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
from grpo_lab.training.packing import PACKINGS
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


def step(model, method, prompts, responses, groups=None) -> None:
    model.zero_grad(set_to_none=True)
    if method == "plain":
        logp, mask, _ = response_logprobs(model, prompts, responses)
    elif method == "group":
        logp, mask, _ = shared_prefix_logprobs(model, prompts, responses, groups or [list(range(len(prompts)))])
    elif method == "auto":
        logp, mask, _ = PACKINGS["auto"].logprobs(model, prompts, responses, groups)
    else:
        logp, mask, _ = trie_logprobs(model, prompts, responses, attention=method.split("-")[1])
    (logp * mask).sum().backward()


def group_rows(gen: random.Random, vocab: int, rows: int, group: int, prompt: int, answer: int):
    """``rows // group`` single-turn groups: ``group`` answers of ``answer`` tokens to one
    prompt of ``prompt`` tokens each; and the rows of each group."""
    prompts, responses, groups = [], [], []
    for g in range(max(1, rows // group)):
        p = torch.tensor([gen.randrange(vocab) for _ in range(prompt)])
        groups.append(list(range(len(prompts), len(prompts) + group)))
        for _ in range(group):
            prompts.append(p)
            responses.append(torch.tensor([gen.randrange(vocab) for _ in range(answer)]))
    return prompts, responses, groups


def interleaved(run, methods, repeats, device) -> list[float]:
    """Median seconds of ``run(method)`` for each method, the methods taking turns in each
    of ``repeats`` rounds (after one warm-up round), so that a slow spell of a shared
    machine falls on all of them alike."""
    import statistics
    import time

    from shared_prefix import sync

    samples: dict[str, list[float]] = {m: [] for m in methods}
    for round_ in range(repeats + 1):
        for m in methods:
            sync(device)
            start = time.perf_counter()
            run(m)
            sync(device)
            if round_:
                samples[m].append(time.perf_counter() - start)
    return [statistics.median(samples[m]) for m in methods]


def sweep(args, model, device) -> None:
    """The ``--sweep`` table (module docstring)."""
    methods = ["plain", "group", "trie-reference", "auto"]
    print("| P | R | G | rows | plain (s) | group | trie | auto | auto chose |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    on_trie, on_plain = [], []  # auto's ratio where it packed, and where it ran the plain forward
    for prompt in args.sweep_prompts:
        for answer in args.sweep_answers:
            for group in args.sweep_groups:
                prompts, responses, groups = group_rows(random.Random(0), model.config.vocab_size, args.rows, group,
                                                        prompt, answer)
                chosen = PACKINGS["auto"].choose(model, prompts, responses).name
                times = interleaved(lambda m: step(model, m, prompts, responses, groups), methods, args.repeats, device)
                plain = times[0]
                (on_trie if chosen == "trie" else on_plain).append(times[-1] / plain)
                print(f"| {prompt} | {answer} | {group} | {len(prompts)} | {plain:.3f} | "
                      + " | ".join(f"{t / plain:.2f}x" for t in times[1:]) + f" | {chosen} |", flush=True)
    print("\nratios are time / plain time (below 1 is faster). auto packed "
          + (f"{len(on_trie)} cases, at {min(on_trie):.2f}x to {max(on_trie):.2f}x" if on_trie else "no case")
          + "; it ran the plain forward itself in "
          + (f"{len(on_plain)} cases, measured at {min(on_plain):.2f}x to {max(on_plain):.2f}x (the same code: the "
             "spread is this machine's noise)" if on_plain else "no case"))


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
    parser.add_argument("--sweep", action="store_true", help="single-turn groups over prompt, answer and group sizes")
    parser.add_argument("--sweep-prompts", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 2000])
    parser.add_argument("--sweep-answers", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--sweep-groups", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rows", type=int, default=64, help="rows of the sweep's micro-batch (trainer.micro_batch_size)")
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
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    if args.sweep:
        print(f"device: {name}; torch {torch.__version__}; config: {args.config}; dtype: {args.dtype}; time = forward "
              "+ backward of the response log-probs of one micro-batch; ratios are times over plain's")
        sweep(args, model, device)
        return
    methods = ["plain", "group", *(f"trie-{a}" for a in args.attention)]
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
