"""Engine processes a run starts (``python -m grpo_lab.serve``): started, watched,
started again when one exits, stopped with the run."""

from __future__ import annotations

import threading
from typing import Sequence

class EngineProcesses:
    """Engine processes this run started: their URLs, read from each one's first line
    (``serving ... at URL``), and their logs; one that exited can be started again
    (:meth:`restart_exited`); all stopped by :meth:`close` (or when this object is
    collected, or the interpreter exits)."""

    def __init__(self, procs: list, urls: list[str], commands: Sequence[Sequence[str]] = (), logs: Sequence = (),
                 timeout_s: float = 600.0) -> None:
        import weakref

        self.procs, self.urls = procs, urls
        self.commands, self.logs, self.timeout_s = [list(c) for c in commands], list(logs), timeout_s
        self._finalizer = weakref.finalize(self, EngineProcesses._stop, self.procs)

    @staticmethod
    def _launch(command: Sequence[str], log, append: bool = False):
        import subprocess
        from pathlib import Path

        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a" if append else "w") as file:
            return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=file, text=True)

    @staticmethod
    def _await_url(proc, log, timeout_s: float) -> str:
        """The URL an engine prints on its first line; ``RuntimeError`` with the end of its
        log when it exits first or takes longer than ``timeout_s``."""
        import time
        from pathlib import Path

        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout_s
        while reader.is_alive() and time.monotonic() < deadline:
            reader.join(0.2)
        line = box[0] if box else ""
        if " at http" not in line:
            tail = Path(log).read_text()[-1500:] if Path(log).exists() else ""
            raise RuntimeError(f"the engine process did not start (exit {proc.poll()}); its log {log} ends:\n{tail}")
        return line.split(" at ")[1].strip()

    @classmethod
    def start(cls, commands: Sequence[Sequence[str]], logs: Sequence, timeout_s: float = 600.0) -> "EngineProcesses":
        """Start every command, then wait for each to print its URL (see :meth:`_await_url`)."""
        procs = [cls._launch(command, log) for command, log in zip(commands, logs)]
        try:
            urls = [cls._await_url(proc, log, timeout_s) for proc, log in zip(procs, logs)]
        except BaseException:
            cls._stop(procs)
            raise
        return cls(procs, urls, commands, logs, timeout_s)

    def restart_exited(self) -> dict[int, tuple[str, str]]:
        """Start again each engine that exited (its log appended to): ``{index: (old URL,
        new URL)}``."""
        import logging

        out = {}
        for i, proc in enumerate(self.procs):
            if proc.poll() is None or not self.commands:
                continue
            logging.getLogger("grpo_lab").warning("engine %d (%s) exited with %s: starting it again", i, self.urls[i],
                                                  proc.returncode)
            self.procs[i] = self._launch(self.commands[i], self.logs[i], append=True)
            new = self._await_url(self.procs[i], self.logs[i], self.timeout_s)
            out[i], self.urls[i] = (self.urls[i], new), new
        return out

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
