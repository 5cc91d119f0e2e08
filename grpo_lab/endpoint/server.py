"""The endpoint as a running server: uvicorn serving the app in a thread of this process.

    endpoint = Endpoint.start(backend, tokenizer, ServeSettings(model="policy", max_tokens=256))
    key = endpoint.sessions.open()           # one episode
    client = openai.OpenAI(base_url=endpoint.base_url, api_key=key)
    ...
    calls = endpoint.sessions.close(key)     # its rows
    endpoint.stop()

It binds 127.0.0.1 unless told otherwise, on a free port unless given one. Requests,
weight swaps (:meth:`Endpoint.paused`) and token capture meet only in the app, the
generation queue and the sessions, none of which assumes the trainer's memory beyond
the backend it is given, so the same server can run in an engine's own process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .app import ServeSettings, Sessions, create_app
from .engine import GenerationQueue
from .tools import TOOL_PARSERS


@dataclass
class Endpoint:
    """A started endpoint: its URL, its run key and sessions, and its queue."""

    host: str
    port: int
    sessions: Sessions
    queue: GenerationQueue
    app: Any
    _server: Any
    _thread: threading.Thread

    @classmethod
    def start(cls, backend, tokenizer, settings: ServeSettings, host: str = "127.0.0.1", port: int = 0,
              api_key: str | None = None, tool_parser: str = "hermes", timeout_s: float = 30.0) -> "Endpoint":
        """Serve ``backend`` (a :class:`~grpo_lab.rollout.backend.Backend`) at
        ``http://host:port/v1`` (``port=0``: a free one); ``api_key``: the run's key
        (random unless given)."""
        import uvicorn

        parser = TOOL_PARSERS.get(tool_parser)
        queue = GenerationQueue(backend)
        sessions = Sessions(api_key)
        app = create_app(queue, tokenizer, settings, sessions, parser)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="grpo_lab-endpoint", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                queue.close()
                raise RuntimeError(f"the endpoint did not start on {host}:{port} (is the port taken?)")
            time.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        return cls(host, bound, sessions, queue, app, server, thread)

    @property
    def base_url(self) -> str:
        """What an OpenAI client's ``base_url`` is set to."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def stats(self):
        return self.app.state.stats

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No generation starts inside this block (the weights can be swapped)."""
        with self.queue.paused():
            yield

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.queue.close()
