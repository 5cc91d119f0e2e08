"""Stopping a run cleanly: on SIGTERM or SIGINT, and when environments fail too often.

The trainer marks the phases it may abandon (warm-up, rollout, evaluation: they change
nothing that a checkpoint holds except random state and sampler bookkeeping, which the
trainer restores). A signal in such a phase abandons it at once; in any other phase (the
update, a checkpoint being written) the phase finishes first. Either way the trainer
then saves the last completed step, writes ``summary.json``, logs how to resume, and
raises :class:`TrainingInterrupted`, whose ``exit_code`` is the conventional ``128 +
signal number`` (130 for SIGINT, 143 for SIGTERM). A second signal abandons whatever
runs; when that is an update (the weights hold part of a step that did not complete),
nothing is saved and the run resumes from its last checkpoint. Signals that arrive while
the run saves its state to stop are only recorded.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class RunStopped(Exception):
    """The run stopped before ``total_steps``; its state up to ``last_step`` is saved
    (``checkpoint``, ``None`` when no step had completed)."""

    exit_code = 1

    def __init__(self, message: str, last_step: int = -1, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.last_step, self.checkpoint = last_step, checkpoint


class TrainingInterrupted(RunStopped):
    """Stopped by SIGTERM or SIGINT (``signum``)."""

    def __init__(self, message: str, signum: int, last_step: int = -1, checkpoint: str | None = None) -> None:
        super().__init__(message, last_step, checkpoint)
        self.signum = signum
        self.exit_code = 128 + signum


class EnvFaultRateExceeded(RunStopped):
    """A rollout lost more than ``rollout.max_env_fault_rate`` of its episodes."""


class CheckpointFailed(RunStopped):
    """A checkpoint could not be written (a full disk); the run stopped at the step it
    belonged to, and ``checkpoint`` (the previous one, if any) is intact."""


class Abandon(BaseException):
    """Raised by the signal handler inside an abandonable phase. A ``BaseException``, so
    that the handlers that turn an environment's exceptions into faults let it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """Installs SIGTERM and SIGINT handlers for the duration of a ``with`` block (only in
    the main thread; elsewhere it does nothing). ``requested`` holds the first signal
    received; inside :meth:`abandonable` a signal raises :class:`Abandon` at once.

    ``deferred``: signals are only recorded, and nothing is abandoned (data-parallel
    runs, whose processes must stop at the same point: the trainer stops after the step
    in progress, once every process has heard of the signal)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred  # only record signals; the caller stops where all processes agree
        self.requested: int | None = None
        self._abandonable = False
        self._shielded = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        first = self.requested is None
        if first:
            self.requested = signum
        if self._shielded or self.deferred:
            return
        if self._abandonable or not first:
            self._abandonable = False
            raise Abandon(signum)

    def shield(self) -> None:
        """From now on signals are only recorded (the run is saving its state to stop)."""
        self._shielded = True

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """A phase a signal may cut short (raising :class:`Abandon`)."""
        if self.deferred:
            yield
            return
        if self.requested is not None:
            raise Abandon(self.requested)
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
