"""The Triton attention kernels against SDPA and FlexAttention (GPU).

    python benchmarks/kernel.py [--groups 4 8 16] [--prefix 1024 4096 16384] [--member 256 512 2048]
                                [--heads 32 --kv-heads 8 --head-dim 128] [--dtype bfloat16]
                                [--no-flex] [--json FILE]
    python benchmarks/kernel.py --layout trie [--workload conversation tree] [--episodes 8]
                                [--turns 5 10] [--trie-prompt 2048] [--answer 256] [--observation 128]
    python benchmarks/kernel.py --tune [--head-dim 64 128] [--tune-json FILE]
    python benchmarks/kernel.py --accuracy [--head-dim 64 128]

Layouts (``--layout``, one or both):

- ``shared-prefix``: one packed row ``[P; R1..RG]`` per shape, timed with
  ``shared_prefix_attention``;
- ``trie``: the trie of a real batch shape, timed with ``trie_attention``: ``G``
  conversation episodes of ``turns`` turns from one first prompt, or 2 Tree-GRPO trees
  of ``turns``-turn chains with ``G`` branches (the rows of ``benchmarks/trie.py``).

Baselines, each checked against the float32 reference on the first case of each kind of
layout before it is timed (on the CPU, FlexAttention's forward only):

- SDPA on the unpacked rows: ``G x [P; Ri]``, or one causal sequence per root-to-leaf
  path of the trie (every episode whole, as a per-episode trainer encodes it), batched
  by length (PyTorch's fused backends only, never the math one; the K and V heads
  expanded to the query heads beforehand, outside the timing);
- FlexAttention (``torch.compile``-d ``flex_attention``) on the same packed layout, with
  a block mask built from it (the prefix-sharing mask of AReaL's tree training): key ``j``
  is seen by queries ``j <= i < end(j)``, ``end`` the end of the key's member, or of its
  trie node's subtree.

Prints forward and forward+backward milliseconds (median of ``triton.testing.do_bench``),
the kernel's achieved TFLOP/s counting only the FLOPs the packed layout needs (the
backward counted as 2.5 forwards), that rate as a share of the dense bf16 matmul rate
measured in the same run (8192^3), and the speedups. ``--tune`` times every candidate
tile shape of each pass (forward, dQ, dK/dV) of the shared-prefix kernel, whose tile
shapes the trie kernel shares, on three shapes, after checking each against the
reference, and prints the winners in the form of ``TUNED`` in
``grpo_lab/kernels/shared_prefix_attention.py``. ``--accuracy`` prints the kernel's
float16 and bfloat16 errors against a float64 reference beside those of PyTorch's SDPA in
the same dtype.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import itertools
import json
import math
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grpo_lab.kernels import shared_prefix_attention as spa
from grpo_lab.kernels import trie_attention as tri
from grpo_lab.kernels.layouts import RowLayout, TrieLayout
from grpo_lab.training.trie import build_trie

P = spa.PassConfig
CANDIDATES = {
    "fwd": [P(64, 64, 4, 2), P(64, 64, 4, 3), P(64, 64, 4, 4), P(64, 128, 4, 3), P(128, 32, 4, 3), P(128, 64, 4, 3),
            P(128, 64, 8, 3), P(128, 64, 8, 4), P(128, 64, 4, 4), P(128, 128, 8, 2), P(128, 128, 8, 3)],
    "dq": [P(64, 64, 4, 2), P(64, 64, 4, 3), P(64, 32, 4, 4), P(128, 32, 4, 3), P(128, 32, 8, 3), P(128, 32, 4, 5),
           P(128, 64, 8, 2), P(128, 64, 8, 3), P(64, 128, 4, 2)],
    "dkdv": [P(64, 64, 4, 2), P(64, 64, 4, 3), P(32, 64, 4, 4), P(32, 128, 4, 3), P(32, 128, 8, 3), P(32, 128, 4, 5),
             P(64, 128, 8, 2), P(64, 128, 8, 3), P(16, 128, 4, 3)],
}
TUNE_SHAPES = [(8, 4096, 512), (16, 1024, 256), (4, 16384, 1024)]
DEVICE = "cuda"  # --device cpu runs everything in Triton's interpreter (a check of this script, not a benchmark)
CHECK_LAYOUT = (RowLayout(300, (70, 190, 129)), RowLayout(64, (200,)))


def bench(fn) -> float:
    """Median milliseconds (CUDA events through ``do_bench``; a wall clock on the CPU)."""
    if DEVICE != "cuda":
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter)"


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def matmul_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    n = n if DEVICE == "cuda" else 256
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    return 2 * n**3 / (bench(lambda: a @ b) * 1e-3) / 1e12


def random_qkv(t: int, h: int, hkv: int, d: int, dtype: torch.dtype):
    q = torch.randn(t, h, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(t, hkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(t, hkv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    return q, k, v, torch.randn_like(q)


def kernel(layout):
    """The Triton kernel for ``layout`` (packed rows or a trie)."""
    return tri.trie_attention if isinstance(layout, TrieLayout) else spa.shared_prefix_attention


def reference_grads(q, k, v, do, layout):
    ins = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    ref = tri.trie_attention_reference if isinstance(layout, TrieLayout) else spa.shared_prefix_attention_reference
    out = ref(*ins, layout)
    return (out.detach(), *torch.autograd.grad(out, ins, do.float()))


# ----------------------------------------------------------------------------- layouts
@dataclass
class Case:
    """One packed layout to time: its table label, the layout the kernels take, the
    attended (query, key) pairs, the lengths of the rows the SDPA baseline encodes instead
    (one causal sequence per prefix-and-member or per root-to-leaf path) and, per packed
    token, the end of the query range that attends to it (FlexAttention's mask)."""

    label: dict
    layout: object
    length: int
    pairs: float
    rows: list[int]
    key_ends: torch.Tensor

    def name(self) -> str:
        return " ".join(str(v) if k == "workload" else f"{k}={v}" for k, v in self.label.items())


def shared_prefix_case(g: int, p: int, r: int) -> Case:
    """One packed row ``[P; R1..RG]``: prefix keys are seen up to the row's end, member keys
    up to their member's end."""
    ends = [p + g * r] * p + [p + (j + 1) * r for j in range(g) for _ in range(r)]
    pairs = p * (p + 1) / 2 + g * (r * p + r * (r + 1) / 2)
    return Case(dict(G=g, P=p, R=r), (RowLayout(p, (r,) * g),), p + g * r, pairs, [p + r] * g, torch.tensor(ends))


def trie_case(workload: str, g: int, turns: int, prompt: int, answer: int, obs: int) -> Case:
    """The trie of a real batch shape (``benchmarks/trie.py``'s rows): ``g`` conversation
    episodes of ``turns`` turns from one first prompt, or 2 Tree-GRPO trees with ``g``
    branches. A key of node ``u`` is seen by the queries up to the end of ``u``'s subtree
    (pre-order), later than itself."""
    from trie import conversation_rows, tree_rows  # benchmarks/trie.py, beside this script

    make = conversation_rows if workload == "conversation" else tree_rows
    rows = make(random.Random(0), 32000, g, turns, prompt, answer, obs)
    layout = build_trie([torch.tensor(ids + ans) for ids, ans in rows]).layout
    has_child = set(layout.parent)
    leaves = [layout.depth[v] + layout.node_len[v] for v in range(layout.num_nodes) if v not in has_child]
    pairs = sum(n * d + n * (n + 1) / 2 for n, d in zip(layout.node_len, layout.depth))
    ends = torch.tensor(layout.subtree_end())[layout.node_of_token()]
    label = dict(workload=workload, G=g, turns=turns, P=prompt, A=answer, O=obs)
    return Case(label, layout, layout.length, pairs, leaves, ends)


# ----------------------------------------------------------------------------- FlexAttention
def make_mask_mod(key_ends: torch.Tensor):
    """The packed layout's mask as a FlexAttention ``mask_mod``: key ``j`` is seen by the
    queries ``j <= i < key_ends[j]`` (0 past the layout's tokens)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < key_ends[kv_idx])
    return mask_mod


def packed_block_mask(key_ends: torch.Tensor, t: int, mask_mod, block: int = 128, chunk: int = 8):
    """FlexAttention ``BlockMask`` for ``t`` tokens, built from the mask in chunks of query
    blocks (``create_block_mask``'s eager path would hold a ``t x t`` mask at once)."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-t // block)
    kv = torch.arange(nb * block, device=key_ends.device)
    partial, full = [], []
    for b0 in range(0, nb, chunk):
        q = torch.arange(b0 * block, min(nb, b0 + chunk) * block, device=key_ends.device)
        m = mask_mod(None, None, q[:, None].clamp(max=t - 1), kv[None, :].clamp(max=t - 1))
        m &= (q[:, None] < t) & (kv[None, :] < t)
        counts = m.view(-1, block, nb, block).sum((1, 3))
        full.append(counts == block * block)
        partial.append((counts > 0) & (counts < block * block))
    partial_b, full_b = torch.cat(partial), torch.cat(full)

    def pack(bits):
        order = torch.argsort((~bits).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return bits.sum(-1).to(torch.int32)[None, None], order[None, None]

    kv_num, kv_idx = pack(partial_b)
    full_num, full_idx = pack(full_b)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(t, t))


class Flex:
    """A compiled ``flex_attention`` and one mask function over a reused buffer of key
    ends, so that new shapes do not recompile for a new mask."""

    def __init__(self, t_max: int):
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
        # compiled on the GPU; in the CPU check, eager and forward only (FlexAttention has no CPU backward)
        self.fn = torch.compile(flex_attention) if DEVICE == "cuda" else flex_attention
        self.key_ends = torch.zeros(t_max, dtype=torch.int64, device=DEVICE)
        self.mask_mod = make_mask_mod(self.key_ends)

    def prepare(self, case: Case):
        self.key_ends.zero_()
        self.key_ends[:case.length].copy_(case.key_ends)
        return packed_block_mask(self.key_ends, case.length, self.mask_mod)

    def __call__(self, q, k, v, block_mask):
        """``[1, H, T, D]`` in and out."""
        return self.fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------- tuning
def _pass_outputs(pass_name, cfg, q, k, v, do, layout, scale, fwd_state):
    starts = spa._row_starts(layout, None)
    if pass_name == "fwd":
        return spa.launch_forward(q, k, v, layout, starts, scale, cfg)[:1]
    o, lse = fwd_state
    if pass_name == "dq":
        return spa.launch_dq(q, k, v, o, do, lse, layout, starts, scale, cfg)[:1]
    _, delta = spa.launch_dq(q, k, v, o, do, lse, layout, starts, scale, spa.DEFAULT.dq)
    return spa.launch_dkdv(q, k, v, do, lse, delta, layout, starts, scale, cfg)


def _check_candidate(args):
    """Compile one candidate (in a worker process, filling Triton's cache) and return its
    largest relative error against the float32 reference on ``CHECK_LAYOUT``, or the error."""
    global DEVICE
    pass_name, cfg, h, hkv, d, dtype_name, DEVICE = args
    try:
        torch.manual_seed(0)
        dtype = getattr(torch, dtype_name)
        t = sum(r.length for r in CHECK_LAYOUT)
        q, k, v, do = (x.detach() for x in random_qkv(t, h, hkv, d, dtype))
        ref = reference_grads(q, k, v, do, CHECK_LAYOUT)
        scale = d ** -0.5
        state = spa.launch_forward(q, k, v, CHECK_LAYOUT, spa._row_starts(CHECK_LAYOUT, None), scale, spa.DEFAULT.fwd)
        got = _pass_outputs(pass_name, cfg, q, k, v, do, CHECK_LAYOUT, scale, state)
        want = {"fwd": ref[:1], "dq": ref[1:2], "dkdv": ref[2:]}[pass_name]
        sync()
        return max(relative_error(a, b) for a, b in zip(want, got))
    except Exception as err:  # noqa: BLE001 - reported per candidate (e.g. out of shared memory)
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def tune(head_dims, h, hkv, dtype_name, workers: int, shapes_to_time=TUNE_SHAPES, candidates=CANDIDATES) -> dict:
    dtype = getattr(torch, dtype_name)
    jobs = [(name, cfg, h, hkv, d, dtype_name, DEVICE) for d in head_dims for name, cands in candidates.items() for cfg in cands]
    start = time.time()
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        checks = dict(zip([(j[0], j[1], j[4]) for j in jobs], pool.map(_check_candidate, jobs)))
    print(f"compiled and checked {len(jobs)} candidates in {time.time() - start:.0f} s ({workers} processes)", flush=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if dtype == torch.float16 else 1e-4
    winners = {}
    for d in head_dims:
        shapes = []
        for g, p, r in shapes_to_time:
            layout = (RowLayout(p, (r,) * g),)
            q, k, v, do = (x.detach() for x in random_qkv(p + g * r, h, hkv, d, dtype))
            state = spa.launch_forward(q, k, v, layout, (0,), d ** -0.5, spa.DEFAULT.fwd)
            shapes.append((layout, q, k, v, do, state))
        chosen = {}
        for name, cands in candidates.items():
            print(f"\nhead dim {d}, pass {name}: median ms per shape (G, P, R) = {shapes_to_time}")
            print("| block_m | block_n | warps | stages | check | " + " | ".join(f"{s}" for s in shapes_to_time) + " | geo-mean vs best |")
            print("|---:|---:|---:|---:|---:|" + "---:|" * (len(shapes_to_time) + 1))
            rows = []
            for cfg in cands:
                check = checks[(name, cfg, d)]
                if isinstance(check, str) or not check < tol:
                    print(f"| {cfg.block_m} | {cfg.block_n} | {cfg.num_warps} | {cfg.num_stages} | {check} |" + " - |" * (len(shapes_to_time) + 1))
                    continue
                times = []
                for layout, q, k, v, do, state in shapes:
                    times.append(bench(lambda: _pass_outputs(name, cfg, q, k, v, do, layout, d ** -0.5, state)))
                rows.append((cfg, check, times))
            if not rows:
                raise SystemExit(f"no candidate of pass {name} compiled and passed its check at head dim {d}")
            best = [min(t[i] for _, _, t in rows) for i in range(len(shapes_to_time))]
            scored = [(math.exp(sum(math.log(t / b) for t, b in zip(times, best)) / len(best)), cfg, check, times)
                      for cfg, check, times in rows]
            for score, cfg, check, times in sorted(scored, key=lambda s: s[0]):
                print(f"| {cfg.block_m} | {cfg.block_n} | {cfg.num_warps} | {cfg.num_stages} | {check:.1e} | "
                      + " | ".join(f"{t:.3f}" for t in times) + f" | {score:.3f} |")
            chosen[name] = min(scored, key=lambda s: s[0])[1]
        winners[d] = spa.KernelConfig(chosen["fwd"], chosen["dq"], chosen["dkdv"])
        del shapes
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print("\nTUNED = {")
    for d, cfg in winners.items():
        print(f"    {d}: KernelConfig(" + ", ".join(
            f"PassConfig({c.block_m}, {c.block_n}, {c.num_warps}, {c.num_stages})" for c in (cfg.fwd, cfg.dq, cfg.dkdv)) + "),")
    print("}")
    return winners


def config_to_json(cfg: spa.KernelConfig) -> dict:
    return {name: vars(getattr(cfg, name)) for name in ("fwd", "dq", "dkdv")}


def config_from_json(obj: dict) -> spa.KernelConfig:
    return spa.KernelConfig(*(spa.PassConfig(**obj[name]) for name in ("fwd", "dq", "dkdv")))


# ----------------------------------------------------------------------------- accuracy
ACCURACY_LAYOUTS = {
    "G=4 short varlen": (RowLayout(5, (3, 7, 1)), RowLayout(40, (17, 5)), RowLayout(0, (6,))),
    "2 rows, 700+4 / 64+1": (RowLayout(700, (300, 128, 77, 512)), RowLayout(64, (1000,))),
    "G=8 P=4096 R=512": (RowLayout(4096, (512,) * 8),),
}


def accuracy(head_dims, h, hkv) -> None:
    """Relative errors against a float64 reference, of the kernel and (the yardstick) of
    PyTorch's own SDPA per segment in the same dtype, on the same inputs."""
    print(f"\nrelative error ||x - x64|| / ||x64|| (heads {h}/{hkv}); kernel / PyTorch SDPA in the same dtype")
    print("| dtype | head dim | layout | out | dq | dk | dv |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for dtype, d, (name, layout) in itertools.product((torch.float16, torch.bfloat16), head_dims, ACCURACY_LAYOUTS.items()):
        torch.manual_seed(0)
        q, k, v, do = random_qkv(sum(r.length for r in layout), h, hkv, d, dtype)
        results = []
        for fn, cast in ((spa.shared_prefix_attention_reference, torch.float64), (spa.shared_prefix_attention_reference, None),
                         (spa.shared_prefix_attention, None)):
            ins = [x.detach().to(cast or dtype).requires_grad_(True) for x in (q, k, v)]
            out = fn(*ins, layout)
            results.append((out.detach(), *torch.autograd.grad(out, ins, do.to(out.dtype))))
        exact, torch_low, kernel = results
        cells = [f"{relative_error(e, a):.1e} / {relative_error(e, b):.1e}" for e, a, b in zip(exact, kernel, torch_low)]
        print(f"| {str(dtype)[6:]} | {d} | {name} | " + " | ".join(cells) + " |", flush=True)


# ----------------------------------------------------------------------------- comparison
def cases(args) -> list[Case]:
    out = []
    if "shared-prefix" in args.layout:
        out += [shared_prefix_case(g, p, r) for g, p, r in itertools.product(args.groups, args.prefix, args.member)]
    if "trie" in args.layout:
        out += [trie_case(w, g, n, args.trie_prompt, args.answer, args.observation)
                for w, g, n in itertools.product(args.workload, args.episodes, args.turns)]
    return out


def time_kernel(layout, q, k, v, do, config, ref) -> tuple[float, float]:
    """Forward and forward+backward ms of the layout's kernel, checked first when ``ref``
    (the float32 reference's output and gradients) is given."""
    attend = kernel(layout)

    def fwd():
        return attend(q, k, v, layout, config=config)

    if ref is not None:
        out = fwd()
        check("kernel", ref, (out.detach(), *torch.autograd.grad(out, (q, k, v), do)))
    return bench(fwd), bench(lambda: torch.autograd.grad(fwd(), (q, k, v), do))


def time_sdpa(lengths: list[int], h: int, d: int, dtype: torch.dtype) -> float:
    """Forward+backward ms of causal SDPA over rows of these lengths (fresh inputs, one
    batch per distinct length; fused backends only on the GPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batches = []
    for n in sorted(set(lengths)):
        qkv = [torch.randn(lengths.count(n), h, n, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]
        batches.append((*qkv, torch.randn_like(qkv[0])))
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def fwd_bwd():
        with sdpa_kernel(fused if DEVICE == "cuda" else [SDPBackend.MATH]):
            for q, k, v, do in batches:
                torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do)

    return bench(fwd_bwd)


def time_flex(flex: "Flex", case: Case, q, k, v, do, ref) -> tuple[float, float]:
    """Forward and forward+backward ms of FlexAttention on the packed layout, checked first
    when ``ref`` is given (on the CPU: the forward only, FlexAttention has no CPU backward)."""
    grad = DEVICE == "cuda"
    block_mask = flex.prepare(case)
    qf, kf, vf, dof = (x.detach().transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v, do))
    for x in (qf, kf, vf):
        x.requires_grad_(grad)

    def fwd():
        return flex(qf, kf, vf, block_mask)

    if ref is not None:
        out = fwd()
        grads = [x[0].transpose(0, 1) for x in torch.autograd.grad(out, (qf, kf, vf), dof)] if grad else ref[1:]
        check("FlexAttention", ref, (out.detach()[0].transpose(0, 1), *grads))
    return bench(fwd), bench(lambda: torch.autograd.grad(fwd(), (qf, kf, vf), dof)) if grad else float("nan")


def check(name: str, ref, got) -> None:
    errs = [relative_error(a, b) for a, b in zip(ref, got)]
    print(f"{name} vs float32 reference (out, dq, dk, dv): {', '.join(f'{e:.1e}' for e in errs)}", flush=True)
    if not max(errs) < 2e-2:
        raise SystemExit(f"{name} disagrees with the reference layout; not timing it")


def compare(args, config: spa.KernelConfig | None) -> None:
    """Time every case: the kernel, SDPA on the unpacked rows, FlexAttention on the packed
    layout. Each implementation is checked against the float32 reference on the first
    case of each kind of layout (shared prefix, conversation, tree) before it is timed."""
    dtype = getattr(torch, args.dtype)
    h, hkv, d = args.heads, args.kv_heads, args.head_dim[0]
    config = config or spa.config_for(d)
    peak = matmul_tflops(dtype)
    todo = cases(args)
    flex = None if args.no_flex else Flex(max(c.length for c in todo))
    print(f"device: {device_name()}; torch {torch.__version__}; triton {__import__('triton').__version__}; "
          f"dtype {args.dtype}; heads {h}/{hkv}; head dim {d}")
    print(f"dense {args.dtype} matmul 8192^3: {peak:.0f} TFLOP/s")
    print(f"kernel config: {config}")
    header = ("| layout | tokens packed | tokens in rows | kernel fwd (ms) | kernel fwd+bwd (ms) | TFLOP/s fwd | "
              "TFLOP/s fwd+bwd | % of matmul | SDPA fwd+bwd (ms) | vs SDPA | Flex fwd (ms) | Flex fwd+bwd (ms) | "
              "vs Flex fwd | vs Flex fwd+bwd |")
    lines = [header, "|---|" + "---:|" * 13]
    print("\n".join(lines), flush=True)
    records, checked = [], set()
    for case in todo:
        kind = case.label.get("workload", "shared-prefix")
        q, k, v, do = random_qkv(case.length, h, hkv, d, dtype)
        # every timed implementation computes the function, on each kind of layout
        ref = reference_grads(q, k, v, do, case.layout) if kind not in checked else None
        checked.add(kind)
        ms_fwd, ms_all = time_kernel(case.layout, q, k, v, do, config, ref)
        ms_sdpa = time_sdpa(case.rows, h, d, dtype)
        flex_fwd, flex_all = time_flex(flex, case, q, k, v, do, ref) if flex is not None else (float("nan"),) * 2
        del q, k, v, do, ref
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        fl = 4.0 * d * h * case.pairs  # QK^T and PV over the attended pairs
        rec = dict(case.label, tokens_packed=case.length, tokens_rows=sum(case.rows), kernel_fwd_ms=ms_fwd,
                   kernel_fwd_bwd_ms=ms_all, tflops_fwd=fl / ms_fwd / 1e9, tflops_fwd_bwd=3.5 * fl / ms_all / 1e9,
                   sdpa_fwd_bwd_ms=ms_sdpa, flex_fwd_ms=flex_fwd, flex_fwd_bwd_ms=flex_all, matmul_tflops=peak)
        records.append(rec)
        line = (f"| {case.name()} | {case.length} | {sum(case.rows)} | {ms_fwd:.3f} | {ms_all:.3f} | "
                f"{rec['tflops_fwd']:.0f} | {rec['tflops_fwd_bwd']:.0f} | {100 * rec['tflops_fwd_bwd'] / peak:.0f}% | "
                f"{ms_sdpa:.2f} | {ms_sdpa / ms_all:.2f}x | {flex_fwd:.3f} | {flex_all:.3f} | {flex_fwd / ms_fwd:.2f}x | "
                f"{flex_all / ms_all:.2f}x |")
        lines.append(line)
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(), torch=torch.__version__, dtype=args.dtype,
                           heads=h, kv_heads=hkv, head_dim=d, config=config_to_json(config), rows=records), f, indent=1)
    print("\n" + "\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--member", type=int, nargs="+", default=[256, 512, 2048])
    parser.add_argument("--layout", nargs="+", default=["shared-prefix"], choices=["shared-prefix", "trie"],
                        help="packed layouts to time: one prefix and G members (--groups, --prefix, --member), "
                             "and/or tries of real batch shapes (--workload, --episodes, --turns, ...)")
    parser.add_argument("--workload", nargs="+", default=["conversation", "tree"], choices=["conversation", "tree"])
    parser.add_argument("--episodes", type=int, nargs="+", default=[8],
                        help="trie: conversation episodes per group, or branches per Tree-GRPO tree")
    parser.add_argument("--turns", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--trie-prompt", type=int, default=2048, help="trie: tokens of the first prompt")
    parser.add_argument("--answer", type=int, default=256, help="trie: tokens of each answer")
    parser.add_argument("--observation", type=int, default=128, help="trie: tokens of each observation")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline")
    parser.add_argument("--json", help="write the comparison's numbers here")
    parser.add_argument("--tune", action="store_true", help="sweep the tile shapes of each pass instead")
    parser.add_argument("--accuracy", action="store_true", help="print the float16/bfloat16 error table instead")
    parser.add_argument("--tune-json", help="write (with --tune) or read the chosen configuration here")
    parser.add_argument("--workers", type=int, default=12, help="processes compiling the candidates (--tune)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: run this script's code paths in Triton's interpreter, tiny shapes (a check, not a benchmark)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel.py needs a CUDA GPU (--device cpu checks the script in Triton's interpreter); "
                         "the kernel's correctness tests run on CPU in tests/test_kernel.py")
    if DEVICE == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--device cpu needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
    if args.accuracy:
        accuracy(args.head_dim, args.heads, args.kv_heads)
        return
    if args.tune:
        quick = DEVICE == "cpu"
        winners = tune(args.head_dim, args.heads, args.kv_heads, args.dtype, args.workers,
                       shapes_to_time=[(2, 64, 32)] if quick else TUNE_SHAPES,
                       candidates={n: c[:2] for n, c in CANDIDATES.items()} if quick else CANDIDATES)
        if args.tune_json:
            with open(args.tune_json, "w") as f:
                json.dump({str(d): config_to_json(c) for d, c in winners.items()}, f, indent=1)
        return
    config = None
    if args.tune_json:
        with open(args.tune_json) as f:
            config = config_from_json(json.load(f)[str(args.head_dim[0])])
    compare(args, config)


if __name__ == "__main__":
    sys.exit(main())
