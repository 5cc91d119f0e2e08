"""The endpoint's cost: the same requests through the OpenAI-compatible endpoint (real
HTTP on 127.0.0.1, the ``openai`` client, token capture on) and straight into the backend.

    python benchmarks/agents.py [--model PATH] [--requests 64] [--max-tokens 32] [--concurrency 1 8 64]

For each concurrency ``c``, ``--requests`` greedy chat requests of at most
``--max-tokens`` tokens are made by ``c`` agents at once, each calling in turn; the
direct run renders the same messages to ids and calls ``backend.generate`` on ``c``
prompts at a time (both paths generate the same tokens; the table counts them). Reported: both wall times, the endpoint's overhead as a share of the
direct generation time, and generated tokens per second through the endpoint. The model
is a random one with a ChatML template (``--hidden``, ``--layers``) unless ``--model`` names
a directory or hub model with its own template. Both runs are measured side by side in one process (the first call
of each warms up and is not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def policy(model_path: str | None, hidden: int, layers: int):
    import torch

    from grpo_lab.modeling import build_tiny_model, load_pretrained

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if model_path:
        return load_pretrained(model_path, dtype)
    from chat_templates import chat_tokenizer

    tok = chat_tokenizer("chatml")
    heads = max(1, hidden // 64)
    return build_tiny_model(tok, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=max(1, heads // 2),
                            intermediate_size=2 * hidden, dtype=dtype, seed=0), tok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--hidden", type=int, default=256, help="the random model's width (without --model)")
    parser.add_argument("--layers", type=int, default=4, help="the random model's depth (without --model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    import openai
    import torch

    from grpo_lab.rollout.backend import SamplingParams
    from grpo_lab.rollout.backends.hf import HFBackend
    from grpo_lab.endpoint.app import ServeSettings
    from grpo_lab.endpoint.chat import ChatTemplate
    from grpo_lab.endpoint.server import Endpoint

    model, tok = policy(args.model, args.hidden, args.layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = HFBackend(model.to(device), tok, max_batch_size=max(args.concurrency))
    template = ChatTemplate(tok)
    messages = [[{"role": "user", "content": f"Task {k}: walk to the goal, avoid the holes."}] for k in range(args.requests)]
    prompts = [template.prompt_ids(m, None) for m in messages]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    endpoint = Endpoint.start(backend, tok, ServeSettings(model="policy", max_tokens=args.max_tokens, max_context=None,
                                                          temperature=0.0))

    def direct(c: int) -> tuple[float, int]:
        t0, tokens = time.perf_counter(), 0
        for start in range(0, len(prompts), c):
            tokens += sum(len(x.token_ids) for x in backend.generate(prompts[start:start + c], params))
        return time.perf_counter() - t0, tokens

    async def served(c: int) -> tuple[float, int]:
        client = openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.sessions.open(), max_retries=0)
        counts = []

        async def agent(k: int) -> None:
            for m in messages[k::c]:
                r = await client.chat.completions.create(model="policy", messages=m, max_tokens=args.max_tokens,
                                                         temperature=0.0)
                counts.append(r.usage.completion_tokens)

        steps = endpoint.queue.stats.engine_steps
        t0 = time.perf_counter()
        await asyncio.gather(*(agent(k) for k in range(c)))
        seconds = time.perf_counter() - t0
        await client.close()
        return seconds, sum(counts), endpoint.queue.stats.engine_steps - steps

    direct(1)  # warm-up
    asyncio.run(served(1))
    rows = []
    for c in args.concurrency:
        d, d_tokens = direct(c)
        e, e_tokens, calls = asyncio.run(served(c))
        rows.append((c, d, e, (e - d) / d, e_tokens / e, d_tokens, e_tokens, -(-len(prompts) // c), calls))
    endpoint.stop()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.requests} requests x {args.max_tokens} tokens, greedy; {name}\n")
    print("| concurrent agents | direct (s) | endpoint (s) | endpoint overhead | endpoint tokens/s | tokens direct / endpoint "
          "| generate calls direct / endpoint |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c, d, e, over, tps, dt, et, dc, ec in rows:
        print(f"| {c} | {d:.3f} | {e:.3f} | {over:+.1%} | {tps:.0f} | {dt} / {et} | {dc} / {ec} |")


if __name__ == "__main__":
    main()
