"""Concurrent requests onto one backend: a thread owns the backend's request stream.

HTTP handlers ``await`` :meth:`GenerationQueue.generate`; one driver thread submits
what arrived to the backend's :class:`~grpo_lab.rollout.backend.RequestStream` and steps
it. On vLLM a request joins the running batch at the next step; on a batch backend
(Hugging Face ``generate``) a burst of requests goes into one ``generate``: after the
first arrives, the queue waits while more keep coming (each within ``gather_gap_s`` of the
last, up to ``gather_max_s`` in all), and all that arrive while a batch decodes go into the
next one.
:meth:`GenerationQueue.paused` holds new requests back while the trainer swaps the
weights; those in flight finish first, or, on a backend that can cut a generation short
(Hugging Face ``generate``), end at once with ``finish_reason="abort"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..rollout.backend import BatchStream, Completion, RequestStream, SamplingParams


@dataclass
class QueueStats:
    """What the queue served: requests, engine steps, and the most requests in flight."""

    requests: int = 0
    engine_steps: int = 0
    peak_inflight: int = 0


class GenerationQueue:
    """Requests from any thread or event loop, generated on ``backend`` by one thread."""

    def __init__(self, backend: Any, gather_gap_s: float = 0.005, gather_max_s: float = 0.05) -> None:
        self.backend = backend
        self.gather_gap_s, self.gather_max_s = gather_gap_s, gather_max_s
        self.stats = QueueStats()
        self._stream: RequestStream = self._open_stream()
        self._batching = isinstance(self._stream, BatchStream)
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._open = threading.Event()  # cleared while paused
        self._open.set()
        self._idle = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="grpo_lab-generation", daemon=True)
        self._thread.start()

    async def generate(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        """One completion of ``prompt`` (token ids)."""
        if self._stopped:
            raise RuntimeError("the generation queue is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._incoming.put((loop, future, list(prompt), params))
        return await future

    @contextlib.contextmanager
    def paused(self, interrupt: bool = False) -> Iterator[None]:
        """No request starts inside this block; it is entered once those in flight are
        done (for a weight swap). ``interrupt``: those in flight end now, where the
        backend can cut a generation short (its ``interrupt`` event), their answers
        ending with ``"abort"`` (the client continues them on the new weights)."""
        self._open.clear()
        cut = getattr(self.backend, "interrupt", None) if interrupt else None
        if cut is not None:
            cut.set()
        try:
            with self._idle:
                self._idle.wait_for(lambda: not self._waiting or self._stopped)
            yield
        finally:
            if cut is not None:
                cut.clear()
            self._open.set()

    def close(self) -> None:
        """Stop the thread; requests still waiting fail with ``RuntimeError``."""
        self._stopped = True
        self._open.set()
        self._incoming.put(None)
        self._thread.join(timeout=30)

    def _open_stream(self) -> RequestStream:
        """The backend's own request stream, or one ``generate`` per step over any backend."""
        return self.backend.stream() if hasattr(self.backend, "stream") else BatchStream(self.backend)

    # ------------------------------------------------------------------ the driver thread
    def _take(self, block: bool) -> list[tuple]:
        """What has arrived (waiting up to 0.5 s for a first request when ``block``); on a
        batch backend, the rest of the burst it opens."""
        items = []
        try:
            items.append(self._incoming.get(block=block, timeout=0.5 if block else None))
            while True:
                items.append(self._incoming.get_nowait())
        except queue.Empty:
            pass
        if self._batching and items and items[-1] is not None:
            deadline = time.monotonic() + self.gather_max_s
            while (left := deadline - time.monotonic()) > 0:
                try:  # the requests of one burst share a generate
                    items.append(self._incoming.get(timeout=min(self.gather_gap_s, left)))
                except queue.Empty:
                    break
                if items[-1] is None:
                    break
        return [i for i in items if i is not None]

    def _deliver(self, key: int, result: Completion | BaseException) -> None:
        loop, future = self._waiting.pop(key)

        def settle() -> None:
            if future.done():  # the handler went away (a client disconnected)
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # its event loop is closed
            pass

    def _run(self) -> None:
        held: list[tuple] = []  # arrived while paused
        while not self._stopped:
            if held and not self._open.is_set():
                self._open.wait(0.05)  # paused: hold what arrived until the weights are swapped
            busy = self._stream.num_unfinished() > 0
            arrived = self._take(block=not busy and not held)
            if self._stopped:
                break
            held.extend(arrived)
            if held and self._open.is_set():
                for loop, future, prompt, params in held:
                    key = next(self._ids)
                    self._waiting[key] = (loop, future)
                    self._stream.submit(key, prompt, params)
                    self.stats.requests += 1
                held = []
                self.stats.peak_inflight = max(self.stats.peak_inflight, len(self._waiting))
            if self._stream.num_unfinished() == 0:
                with self._idle:
                    self._idle.notify_all()
                continue
            try:
                done = self._stream.step()
            except Exception as err:  # the engine failed: every request in flight fails, the queue goes on
                for key in list(self._waiting):
                    self._deliver(key, RuntimeError(f"generation failed: {err}"))
                self._stream = self._open_stream()
                continue
            self.stats.engine_steps += 1
            for key, completion in done:
                self._deliver(key, completion)
        for key in list(self._waiting):
            self._deliver(key, RuntimeError("the generation queue is closed"))
        for loop, future, _, _ in held + self._take(block=False):
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_exception(RuntimeError("queue closed")))
        with self._idle:
            self._idle.notify_all()
