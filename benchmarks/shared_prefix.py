"""Training-step cost with and without the shared-prefix forward (Prefix Grouper).

    python benchmarks/shared_prefix.py [--groups 4 8 16] [--ratios 1 4 16] [--response 32]
                                       [--prefix P] [--groups-per-batch 2]
                                       [--config tiny|real|qwen2.5-1.5b] [--device cpu|cuda]
                                       [--dtype float32] [--attention reference triton] [--repeats 3]

For each group size G and prompt length (``--prefix``, or ``ratio * R`` for each ratio), one
micro-batch of ``--groups-per-batch`` groups (G responses of R tokens each) runs the
update's forward and backward (response log-probs, summed, backpropagated to every weight)
through ``response_logprobs`` (every row repeats its prompt: "plain") and through
``shared_prefix_logprobs`` with each packed-attention backend in ``--attention``
(``reference``: PyTorch SDPA; ``triton``: the kernel, CUDA only). The table gives tokens
processed, median wall-clock time, peak memory (CUDA only), the measured speedups and the
FLOP-model ideal ``G(P+R) / (P+GR)`` of the token-wise (non-attention) part. A method that
runs out of memory shows "OOM". Models have random weights: ``tiny`` is the default run's
model, ``real`` a Qwen2.5-0.5B-sized and ``qwen2.5-1.5b`` a Qwen2.5-1.5B-sized configuration.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo_lab.training.forward import response_logprobs
from grpo_lab.training.shared_prefix import enable_shared_prefix, shared_prefix_logprobs

CONFIGS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, vocab_size=512, max_position_embeddings=32768),
    "real": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, method, prompts, responses, groups) -> None:
    model.zero_grad(set_to_none=True)
    if method == "plain":
        logp, mask, _ = response_logprobs(model, prompts, responses)
    else:
        logp, mask, _ = shared_prefix_logprobs(model, prompts, responses, groups, attention=method)
    (logp * mask).sum().backward()


def measure(run, model, repeats, device):
    """Median seconds and peak MiB (CUDA) of ``run()`` (one forward+backward of ``model``),
    or ``(None, "OOM")`` on out-of-memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        run()  # warm-up (and kernel compilation)
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return None, "OOM"
    peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "-"
    return statistics.median(times), peak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--ratios", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prefix", type=int, nargs="+", help="prompt lengths P (instead of --ratios)")
    parser.add_argument("--response", type=int, default=32, help="response length R")
    parser.add_argument("--groups-per-batch", type=int, default=2)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", nargs="+", default=["reference"], choices=["reference", "triton"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tuned-json", help="kernel configurations from benchmarks/kernel.py --tune to use "
                        "instead of the shipped ones")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.tuned_json:
        import json

        from grpo_lab.kernels import shared_prefix_attention as spa

        with open(args.tuned_json) as f:
            for d, cfg in json.load(f).items():
                spa.TUNED[int(d)] = spa.KernelConfig(*(spa.PassConfig(**cfg[n]) for n in ("fwd", "dq", "dkdv")))
    device = torch.device(args.device)
    if "triton" in args.attention and device.type != "cuda":
        raise SystemExit("--attention triton needs --device cuda")
    dtype = getattr(torch, args.dtype)
    config = AutoConfig.for_model("qwen2", **CONFIGS[args.config])
    torch.manual_seed(0)
    with device:
        model = enable_shared_prefix(AutoModelForCausalLM.from_config(config, dtype=dtype))
    methods = ["plain", *args.attention]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {name}; torch {torch.__version__}; config: {args.config} ({n_params / 1e9:.2f}B parameters); "
          f"dtype: {args.dtype}; {args.groups_per_batch} group(s) per micro-batch; R = {args.response}; "
          "time = forward + backward of the response log-probs")
    print("| G | P | R | tokens plain | tokens shared | " + " | ".join(f"{m} (s)" for m in methods) + " | "
          + " | ".join(f"peak MiB {m}" for m in methods) + " | " + " | ".join(f"speedup {m}" for m in methods[1:])
          + " | ideal G(P+R)/(P+GR) |")
    print("|" + "---:|" * (5 + 3 * len(methods)))
    gen = torch.Generator().manual_seed(0)
    r = args.response
    for g in args.groups:
        for p in args.prefix or [ratio * r for ratio in args.ratios]:
            prompts, responses, groups = [], [], []
            for _ in range(args.groups_per_batch):
                prompt = torch.randint(0, config.vocab_size, (p,), generator=gen)
                groups.append(list(range(len(prompts), len(prompts) + g)))
                prompts += [prompt] * g
                responses += [torch.randint(0, config.vocab_size, (r,), generator=gen) for _ in range(g)]
            results = [measure(lambda: step(model, m, prompts, responses, groups), model, args.repeats, device)
                       for m in methods]
            times = [f"{t:.3f}" if t is not None else "OOM" for t, _ in results]
            peaks = [peak for _, peak in results]
            base = results[0][0]
            speedups = [f"{base / t:.2f}x" if base is not None and t is not None else "-" for t, _ in results[1:]]
            ideal = g * (p + r) / (p + g * r)
            n = args.groups_per_batch
            print(f"| {g} | {p} | {r} | {n * g * (p + r)} | {n * (p + g * r)} | " + " | ".join(times) + " | "
                  + " | ".join(peaks) + " | " + " | ".join(speedups) + f" | {ideal:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
