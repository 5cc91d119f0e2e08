"""Which engine a request goes to: a prompt where the same prompt went last (a group's
members meet in one engine's prefix cache), else the engine with the fewest requests in
flight; engines that could not be reached are left out."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Iterable, Sequence

from ..backend import EngineError

class Router:
    """Which engine a request goes to: the one that served the same prompt last (the
    members of a group share their first prompt and meet in its prefix cache), else the
    engine with the fewest requests in flight; engines marked down get none."""

    def __init__(self, urls: Sequence[str], remember: int = 65536) -> None:
        self.urls = list(urls)
        self.inflight = {url: 0 for url in self.urls}
        self.down: set[str] = set()
        self.remember = remember
        self._last: dict[bytes, str] = {}  # prompt digest -> engine, oldest first
        self._lock = threading.Lock()

    @staticmethod
    def key(prompt: Sequence[int]) -> bytes:
        return hashlib.blake2b(json.dumps(list(prompt)).encode(), digest_size=16).digest()

    def acquire(self, prompt: Sequence[int], avoid: Iterable[str] = ()) -> str:
        """The engine for ``prompt`` (not one of ``avoid``), counted in flight until
        :meth:`release`; ``EngineError`` when no engine is up."""
        key, avoid = self.key(prompt), set(avoid)
        with self._lock:
            up = [u for u in self.urls if u not in self.down and u not in avoid]
            if not up:
                raise EngineError(f"no engine is up (down: {sorted(self.down | avoid)})")
            url = self._last.get(key)
            if url not in up:
                url = min(up, key=lambda u: self.inflight[u])  # ties: the first listed
            self._last.pop(key, None)
            self._last[key] = url
            if len(self._last) > self.remember:
                self._last.pop(next(iter(self._last)))
            self.inflight[url] += 1
            return url

    def up(self) -> list[str]:
        """The engines not marked down."""
        with self._lock:
            return [u for u in self.urls if u not in self.down]

    def release(self, url: str) -> None:
        with self._lock:
            self.inflight[url] -= 1

    def mark_down(self, url: str) -> None:
        with self._lock:
            self.down.add(url)

    def set_urls(self, urls: Sequence[str]) -> None:
        """The engines are at ``urls`` now (rank 0's list, after a restart)."""
        with self._lock:
            for old, new in zip(list(self.urls), urls):
                if old != new:
                    self._move(old, new)

    def replace(self, old: str, new: str) -> None:
        """A restarted engine at ``new`` takes ``old``'s place (up again)."""
        with self._lock:
            self._move(old, new)

    def _move(self, old: str, new: str) -> None:
        """Engine ``old`` listens at ``new`` now, and is up (the lock held)."""
        self.urls[self.urls.index(old)] = new
        self.inflight[new] = self.inflight.pop(old, 0)
        self.down.discard(old)
        self._last = {k: (new if u == old else u) for k, u in self._last.items()}
