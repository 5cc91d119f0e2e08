"""Engines in their own processes: the :class:`~grpo_lab.rollout.backend.Backend`
protocol over their OpenAI-compatible endpoints (``python -m grpo_lab.serve``), and the
weights pushed to them over ``torch.distributed``.

Generation: a prompt's token ids go to ``/v1/completions`` (``prompt`` as ids,
``logprobs=1``), and the answer's ids and log-probs come back as the engine sampled
them. Requests are spread over the engines by their prompt, so that the members of a
group (one prompt) meet in one engine's prefix cache.

Weights: the trainer (rank 0) and the engines (ranks 1..N) form a process group of their
own (gloo; :func:`weight_group`), set up once through ``/v1/weights/connect``; each push
is one ``/v1/weights/update`` call per engine, after which the trainer broadcasts the
tensors one at a time, each preceded by a small header (name, dtype, shape), so that
no side holds more than one tensor beyond its model. Every push carries a version; the
engine answers with it, and every completion names the version that produced it.

Departures, stated: one trainer process (no data parallelism with engines yet); no
LoRA adapters (whole weights only); a turn after the first of a conversation may go to
another engine than its group's first turn.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ..backend import BatchStream, Completion, SamplingParams, per_request

#: the dtypes a push carries, by code (every tensor travels as its bytes)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)
HEADER = 16  # int64 slots: kind, dtype code, ndim, name length, then up to 12 dims
END, TENSOR = 0, 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def weight_group(host: str, port: int, rank: int, world: int, timeout_s: float = 300.0):
    """A gloo process group of ``world`` ranks through a TCP store at ``host:port`` (rank 0
    hosts it), apart from any default group this process has (the trainer's DDP)."""
    from torch.distributed import ProcessGroupGloo, TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    store = TCPStore(host, port, world, rank == 0, timeout=timeout)
    return ProcessGroupGloo(store, rank, world, timeout)


def _broadcast(group, tensor: Tensor) -> None:
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def send_tensors(group, named_tensors: Iterable[tuple[str, Tensor]]) -> int:
    """Rank 0: broadcast each tensor after its header, then the end mark; the count."""
    count = 0
    for name, tensor in named_tensors:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype not in DTYPES or tensor.dim() > HEADER - 4:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} with {tensor.dim()} dims cannot be pushed")
        encoded = name.encode()
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[:4] = torch.tensor([TENSOR, DTYPES.index(tensor.dtype), tensor.dim(), len(encoded)])
        header[4:4 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        _broadcast(group, header)
        _broadcast(group, torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
        _broadcast(group, tensor.reshape(-1).view(torch.uint8))
        count += 1
    _broadcast(group, torch.zeros(HEADER, dtype=torch.int64))  # kind END
    return count


def receive_tensors(group) -> Iterator[tuple[str, Tensor]]:
    """Ranks > 0: the tensors rank 0 sends, one at a time, until its end mark."""
    while True:
        header = torch.zeros(HEADER, dtype=torch.int64)
        _broadcast(group, header)
        kind, code, ndim, length = (int(x) for x in header[:4])
        if kind == END:
            return
        name = torch.zeros(length, dtype=torch.uint8)
        _broadcast(group, name)
        dtype, shape = DTYPES[code], [int(x) for x in header[4:4 + ndim]]
        data = torch.empty(shape, dtype=dtype)
        _broadcast(group, data.reshape(-1).view(torch.uint8))
        yield bytes(name.tolist()).decode(), data


class EngineProcesses:
    """Engine processes this run started: their URLs, read from each one's first line
    (``serving ... at URL``), and their logs; stopped by :meth:`close` (or when this
    object is collected, or the interpreter exits)."""

    def __init__(self, procs: list, urls: list[str]) -> None:
        import weakref

        self.procs, self.urls = procs, urls
        self._finalizer = weakref.finalize(self, EngineProcesses._stop, list(procs))

    @classmethod
    def start(cls, commands: Sequence[Sequence[str]], logs: Sequence, timeout_s: float = 600.0) -> "EngineProcesses":
        """Start every command, then wait for each to print its URL; ``RuntimeError``
        with the end of its log when one exits first or takes longer than ``timeout_s``."""
        import subprocess
        import time
        from pathlib import Path

        procs, files = [], []
        for command, log in zip(commands, logs):
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            files.append(open(log, "w"))
            procs.append(subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=files[-1], text=True))
        urls = []
        try:
            for proc, log in zip(procs, logs):
                line, box = "", []
                reader = threading.Thread(target=lambda p=proc, b=box: b.append(p.stdout.readline()), daemon=True)
                reader.start()
                deadline = time.monotonic() + timeout_s
                while reader.is_alive() and time.monotonic() < deadline:
                    reader.join(0.2)
                line = box[0] if box else ""
                if " at http" not in line:
                    tail = Path(log).read_text()[-1500:] if Path(log).exists() else ""
                    raise RuntimeError(f"the engine process did not start (exit {proc.poll()}); its log {log} ends:\n"
                                       f"{tail}")
                urls.append(line.split(" at ")[1].strip())
        except BaseException:
            cls._stop(procs)
            raise
        finally:
            for f in files:
                f.close()
        return cls(procs, urls)

    @staticmethod
    def _stop(procs) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()

    def close(self) -> None:
        self._finalizer()


class EngineError(RuntimeError):
    """An engine that did not answer, or answered an error."""


class RemoteBackend:
    """Engines at ``urls`` (their ``/v1`` base URLs), called with the run's ``api_key``."""

    def __init__(self, urls: Sequence[str], api_key: str, model: str, timeout_s: float = 600.0,
                 weight_host: str = "127.0.0.1", max_batch_size: int | None = None) -> None:
        import logging

        import httpx

        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
        if not urls:
            raise ValueError("RemoteBackend needs at least one engine URL")
        self.urls, self.api_key, self.model = [u.rstrip("/") for u in urls], api_key, model
        self.timeout_s, self.weight_host, self.max_batch_size = timeout_s, weight_host, max_batch_size
        self.client = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"},
                                   limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        self.pool = ThreadPoolExecutor(max_workers=64)
        self.version = 0
        self._group = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ generation
    def engine_of(self, prompt: Sequence[int]) -> str:
        """The engine a prompt goes to: the same for the same prompt (a group's members)."""
        digest = hashlib.blake2b(json.dumps(list(prompt)).encode(), digest_size=8).digest()
        return self.urls[int.from_bytes(digest, "little") % len(self.urls)]

    def post(self, url: str, path: str, body: dict) -> dict:
        try:
            response = self.client.post(url + path, json=body)
        except Exception as err:  # connection refused, timeout
            raise EngineError(f"engine {url}: {type(err).__name__}: {err}") from None
        if response.status_code != 200:
            raise EngineError(f"engine {url}{path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def complete(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        body = {"model": self.model, "prompt": list(prompt), "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "logprobs": 1}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        choice = self.post(self.engine_of(prompt), "/completions", body)["choices"][0]
        return Completion(list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"]),
                          choice["finish_reason"])

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """One completion per prompt, the requests sent at once (the engines batch them)."""
        return list(self.pool.map(self.complete, prompts, per_request(params, len(prompts))))

    def stream(self) -> BatchStream:
        return BatchStream(self, self.max_batch_size)

    # ------------------------------------------------------------------ weights
    def connect(self) -> None:
        """The weight group with every engine (once)."""
        port, world = free_port(self.weight_host), len(self.urls) + 1
        calls = [self.pool.submit(self.post, url, "/weights/connect",
                                  {"host": self.weight_host, "port": port, "rank": rank, "world": world})
                 for rank, url in enumerate(self.urls, start=1)]
        self._group = weight_group(self.weight_host, port, 0, world, self.timeout_s)
        for call in calls:
            call.result()

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Push the weights to every engine; they serve version ``self.version`` after."""
        with self._lock:
            if self._group is None:
                self.connect()
            version = self.version + 1
            calls = [self.pool.submit(self.post, url, "/weights/update", {"version": version}) for url in self.urls]
            send_tensors(self._group, named_tensors)
            answers = [call.result() for call in calls]
            wrong = [a for a in answers if a.get("version") != version]
            if wrong:
                raise EngineError(f"an engine answered the weight push of version {version} with {wrong[0]}")
            self.version = version

    def load_adapter(self, tensors, peft_config) -> None:
        raise NotImplementedError("LoRA adapters to engines in their own processes are not supported yet")

    def sleep(self) -> None:
        """The engines keep their memory: they run on their own devices."""

    def wake(self) -> None:
        """See :meth:`sleep`."""

    processes: EngineProcesses | None = None  # the engines this run started (stopped by close)

    def close(self) -> None:
        """Stop the engines this run started; close the connections."""
        if self.processes is not None:
            self.processes.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
