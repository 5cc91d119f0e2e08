"""The Triton shared-prefix attention kernel against SDPA and FlexAttention (GPU).

    python benchmarks/kernel.py [--groups 4 8 16] [--prefix 1024 4096 16384] [--member 256 512 2048]
                                [--heads 32 --kv-heads 8 --head-dim 128] [--dtype bfloat16]
                                [--no-flex] [--json FILE]
    python benchmarks/kernel.py --tune [--head-dim 64 128] [--tune-json FILE]
    python benchmarks/kernel.py --accuracy [--head-dim 64 128]

One packed row ``[P; R1..RG]`` per shape. Baselines, each checked against the float32
reference before it is timed:

- SDPA on the repeated-prefix layout ``G x [P; Ri]`` (PyTorch's fused backends only, never
  the math one; K and V expanded to the query heads beforehand, outside the timing);
- FlexAttention (``torch.compile``-d ``flex_attention``) on the same packed layout, with a
  block mask built from it (the prefix-sharing mask of AReaL's tree training).

Prints forward and forward+backward milliseconds (median of ``triton.testing.do_bench``),
the kernel's achieved TFLOP/s counting only the FLOPs the shared layout needs (the
backward counted as 2.5 forwards), that rate as a share of the dense bf16 matmul rate
measured in the same run (8192^3), and the speedups. ``--tune`` times every candidate
tile shape of each pass (forward, dQ, dK/dV) on three shapes, after checking each against
the reference, and prints the winners in the form of ``TUNED`` in
``grpo_lab/kernels/shared_prefix_attention.py``. ``--accuracy`` prints the kernel's float16
and bfloat16 errors against a float64 reference beside those of PyTorch's SDPA in the
same dtype.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import itertools
import json
import math
import multiprocessing
import sys
import time

import torch
import torch.nn.functional as F

from grpo_lab.kernels import shared_prefix_attention as spa
from grpo_lab.training.shared_prefix import RowLayout

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


def shared_flops(g: int, p: int, r: int, h: int, d: int) -> float:
    """Forward FLOPs of attention in the shared layout (QK^T and PV over allowed pairs)."""
    pairs = p * (p + 1) / 2 + g * (r * p + r * (r + 1) / 2)
    return 4.0 * d * h * pairs


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


def reference_grads(q, k, v, do, layout):
    ins = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    out = spa.shared_prefix_attention_reference(*ins, layout)
    return (out.detach(), *torch.autograd.grad(out, ins, do.float()))


# ----------------------------------------------------------------------------- FlexAttention
ROW = 2**20  # segment ids: row * ROW + 0 on the row's prefix, + 1 + j on its member j


def segment_ids(layout, t_max: int) -> torch.Tensor:
    """Per token, ``row * ROW`` on a row's prefix and ``row * ROW + 1 + j`` on its member
    ``j``; -1 past the rows (rows back to back from token 0)."""
    seg = torch.full((t_max,), -1, dtype=torch.int64)
    start = 0
    for i, row in enumerate(layout):
        seg[start:start + row.prefix_len] = i * ROW
        pos = start + row.prefix_len
        for j, n in enumerate(row.member_lens):
            seg[pos:pos + n] = i * ROW + 1 + j
            pos += n
        start = pos
    return seg


def make_mask_mod(seg: torch.Tensor):
    """The shared-prefix mask as a FlexAttention ``mask_mod``: a key is seen by a later (or
    the same) query of its row when it is a prefix key or in the query's own member."""
    def mask_mod(b, h, q_idx, kv_idx):
        sq, sk = seg[q_idx], seg[kv_idx]
        same_row = (sq // ROW) == (sk // ROW)
        return (kv_idx <= q_idx) & (sk >= 0) & (sq >= 0) & same_row & (((sk % ROW) == 0) | (sk == sq))
    return mask_mod


def packed_block_mask(seg: torch.Tensor, t: int, mask_mod, block: int = 128, chunk: int = 8):
    """FlexAttention ``BlockMask`` for ``t`` tokens, built from the mask in chunks of query
    blocks (``create_block_mask``'s eager path would hold a ``t x t`` mask at once)."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-t // block)
    kv = torch.arange(nb * block, device=seg.device)
    partial, full = [], []
    for b0 in range(0, nb, chunk):
        q = torch.arange(b0 * block, min(nb, b0 + chunk) * block, device=seg.device)
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
    """A compiled ``flex_attention`` and one mask function over a reused segment buffer, so
    that new shapes do not recompile for a new mask."""

    def __init__(self, t_max: int):
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
        self.fn = torch.compile(flex_attention)
        self.seg = torch.full((t_max,), -1, dtype=torch.int64, device=DEVICE)
        self.mask_mod = make_mask_mod(self.seg)

    def prepare(self, layout, t: int):
        self.seg.fill_(-1)
        self.seg[:t].copy_(segment_ids(layout, t))
        return packed_block_mask(self.seg, t, self.mask_mod)

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
def compare(args, config: spa.KernelConfig | None) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = getattr(torch, args.dtype)
    h, hkv, d = args.heads, args.kv_heads, args.head_dim[0]
    config = config or spa.config_for(d)
    peak = matmul_tflops(dtype)
    shapes = list(itertools.product(args.groups, args.prefix, args.member))
    flex = None if args.no_flex else Flex(max(p + g * r for g, p, r in shapes))
    print(f"device: {device_name()}; torch {torch.__version__}; triton {__import__('triton').__version__}; "
          f"dtype {args.dtype}; heads {h}/{hkv}; head dim {d}")
    print(f"dense {args.dtype} matmul 8192^3: {peak:.0f} TFLOP/s")
    print(f"kernel config: {config}")
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    header = ("| G | P | R | kernel fwd (ms) | kernel fwd+bwd (ms) | TFLOP/s fwd | TFLOP/s fwd+bwd | % of matmul | "
              "SDPA fwd+bwd (ms) | vs SDPA | Flex fwd (ms) | Flex fwd+bwd (ms) | vs Flex fwd | vs Flex fwd+bwd |")
    lines = [header, "|" + "---:|" * 14]
    print("\n".join(lines), flush=True)
    records = []
    for i, (g, p, r) in enumerate(shapes):
        layout = (RowLayout(p, (r,) * g),)
        t = p + g * r
        q, k, v, do = random_qkv(t, h, hkv, d, dtype)

        def kernel_fwd():
            return spa.shared_prefix_attention(q, k, v, layout, config=config)

        def kernel_fwd_bwd():
            torch.autograd.grad(kernel_fwd(), (q, k, v), do)

        qr = torch.randn(g, h, p + r, d, device=DEVICE, dtype=dtype, requires_grad=True)
        kr = torch.randn(g, h, p + r, d, device=DEVICE, dtype=dtype, requires_grad=True)
        vr = torch.randn(g, h, p + r, d, device=DEVICE, dtype=dtype, requires_grad=True)
        dor = torch.randn_like(qr)

        def sdpa_fwd_bwd():
            with sdpa_kernel(fused if DEVICE == "cuda" else [SDPBackend.MATH]):
                out = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
            torch.autograd.grad(out, (qr, kr, vr), dor)

        if i == 0:  # every timed implementation computes the function, on this shape
            ref = reference_grads(q, k, v, do, layout)
            out = kernel_fwd()
            got = (out.detach(), *torch.autograd.grad(out, (q, k, v), do))
            errs = [relative_error(a, b) for a, b in zip(ref, got)]
            print(f"kernel vs float32 reference (out, dq, dk, dv): {', '.join(f'{e:.1e}' for e in errs)}")
            if not max(errs) < 2e-2:
                raise SystemExit("the kernel disagrees with its reference; not timing it")
        ms_fwd, ms_all, ms_sdpa = bench(kernel_fwd), bench(kernel_fwd_bwd), bench(sdpa_fwd_bwd)
        del qr, kr, vr, dor
        flex_fwd = flex_all = float("nan")
        if flex is not None:
            bm = flex.prepare(layout, t)
            qf, kf, vf, dof = (x.detach().transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v, do))
            for x in (qf, kf, vf):
                x.requires_grad_(True)

            def flex_fwd_only():
                return flex(qf, kf, vf, bm)

            def flex_fwd_bwd():
                torch.autograd.grad(flex_fwd_only(), (qf, kf, vf), dof)

            if i == 0:
                out = flex_fwd_only()
                got = (out.detach()[0].transpose(0, 1), *(x[0].transpose(0, 1) for x in torch.autograd.grad(out, (qf, kf, vf), dof)))
                errs = [relative_error(a, b) for a, b in zip(ref, got)]
                print(f"FlexAttention vs float32 reference (out, dq, dk, dv): {', '.join(f'{e:.1e}' for e in errs)}")
                if not max(errs) < 2e-2:
                    raise SystemExit("FlexAttention's block mask disagrees with the reference layout")
            flex_fwd, flex_all = bench(flex_fwd_only), bench(flex_fwd_bwd)
            del qf, kf, vf, dof, bm
        fl = shared_flops(g, p, r, h, d)
        rec = dict(G=g, P=p, R=r, kernel_fwd_ms=ms_fwd, kernel_fwd_bwd_ms=ms_all, tflops_fwd=fl / ms_fwd / 1e9,
                   tflops_fwd_bwd=3.5 * fl / ms_all / 1e9, sdpa_fwd_bwd_ms=ms_sdpa, flex_fwd_ms=flex_fwd,
                   flex_fwd_bwd_ms=flex_all, matmul_tflops=peak)
        records.append(rec)
        line = (f"| {g} | {p} | {r} | {ms_fwd:.3f} | {ms_all:.3f} | {rec['tflops_fwd']:.0f} | {rec['tflops_fwd_bwd']:.0f} | "
                f"{100 * rec['tflops_fwd_bwd'] / peak:.0f}% | {ms_sdpa:.2f} | {ms_sdpa / ms_all:.2f}x | "
                f"{flex_fwd:.3f} | {flex_all:.3f} | {flex_fwd / ms_fwd:.2f}x | {flex_all / ms_all:.2f}x |")
        lines.append(line)
        print(line, flush=True)
        del q, k, v, do
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(), torch=torch.__version__, dtype=args.dtype,
                           heads=h, kv_heads=hkv, head_dim=d, config=config_to_json(config), rows=records), f, indent=1)
    print("\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--member", type=int, nargs="+", default=[256, 512, 2048])
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
    args = parser.parse_args()
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
