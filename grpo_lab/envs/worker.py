"""The environment worker process (``python -m grpo_lab.envs.worker FD``).

Kept apart from the rollout engine so that a worker imports only the environments (not
torch or transformers) and starts in a fraction of a second; the parent side is
:mod:`grpo_lab.rollout.env_pool`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Hashable

from . import get_env_factory
from .base import Env


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@dataclass(frozen=True)
class EnvSpec:
    """What a worker process needs to build the environment: the registered factory (sent
    by reference: a module-level class or function) and its keyword arguments."""

    name: str
    factory: Callable[..., Env]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_registry(cls, name: str, kwargs: dict[str, Any] | None = None) -> "EnvSpec":
        return cls(name, get_env_factory(name), dict(kwargs or {}))

    def make(self) -> Env:
        return self.factory(**self.kwargs)


def _die_with_parent(poll_s: float = 1.0) -> None:
    """End this process soon after its parent is gone, even while an environment step
    hangs (a watcher thread; the kernel's PDEATHSIG would fire when the parent's
    *thread* that started the worker ends, which a thread pool does)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def worker_main(fd: int) -> None:
    """A worker's life on the connection ``fd``: first the :class:`EnvSpec`, then
    requests until the parent closes the connection. SIGINT and SIGTERM are ignored (the
    trainer decides when to stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    conn = Connection(fd)
    try:
        spec = conn.recv()
    except Exception as err:  # the factory's module cannot be imported here
        conn.send(("error", f"cannot build the environment in a worker process: {first_line(err)}"))
        return
    conn.send(("ok", None))
    serve(conn, spec)


def serve(conn: Connection, spec: EnvSpec) -> None:
    """``(op, key, arg)`` in, ``("ok", value)`` or ``("error", line)`` out."""
    envs: dict[Hashable, Env] = {}
    while True:
        try:
            op, key, arg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "reset":
                if key not in envs:
                    envs[key] = spec.make()
                value: Any = envs[key].reset(arg)
            elif op == "step":
                value = envs[key].step(arg)
            elif op == "legal":
                value = envs[key].legal_actions()
            elif op == "replay":
                seed, actions = arg
                env = envs[key] = spec.make()
                value = env.reset(seed)
                for action in actions:
                    value = env.step(action).observation
            elif op == "close":
                value = None
                env = envs.pop(key, None)
                if env is not None and callable(getattr(env, "close", None)):
                    env.close()
            elif op == "clear":
                value = None
                envs.clear()
            else:
                raise ValueError(f"unknown operation {op!r}")
            conn.send(("ok", value))
        except Exception as err:
            try:
                conn.send(("error", first_line(err)))
            except Exception:
                return


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
