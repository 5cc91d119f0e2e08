"""Environments that cannot take a run down: faults become :class:`EnvFault`, and with
worker processes a hung step is abandoned.

The rollout loops get their environments from an :class:`EnvRunner`, a factory that
makes either

- in-process environments (``workers=0``), whose exceptions and non-finite rewards
  become :class:`EnvFault` (a hung step cannot be abandoned in process), or
- proxies of environments living in ``workers`` worker processes. A call that takes
  longer than ``step_timeout_s`` kills its worker and raises an ``EnvFault`` of kind
  ``timeout``; a worker that dies raises one of kind ``error``. The worker is replaced at
  once, and the other environments it held are rebuilt in the new one by resetting them
  from their seeds and replaying their actions (environments are deterministic in their
  seed, :class:`~grpo_lab.envs.base.Env`); the replay is checked against the state each
  had reached, so only the faulty episode is lost.

A proxy's calls are serialised per worker (a lock), so the schedulers' threads
(``SchedulerConfig.env_workers``) step environments of different workers at the same
time. Workers ignore SIGINT and SIGTERM (the trainer decides when to stop) and end when
their parent does.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Hashable

from ..envs.base import Env, Observation, StepResult, TextFormat, role_instructions_of, text_format_of
from ..envs.worker import EnvSpec, first_line

FAULT_KINDS = ("error", "timeout", "nonfinite", "overlong")


class EnvFault(Exception):
    """An episode that cannot go on: its environment raised (``error``), hung
    (``timeout``), returned a non-finite reward (``nonfinite``), or its prompt does not
    fit the model's context (``overlong``)."""

    def __init__(self, kind: str, env_name: str, seed: int | None, step: int, message: str) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r} is not one of {list(FAULT_KINDS)}")
        self.kind, self.env_name, self.seed, self.step, self.message = kind, env_name, seed, step, message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"env {self.env_name!r} seed {self.seed} step {self.step}: {self.kind}: {self.message}"

    def __reduce__(self):
        return EnvFault, (self.kind, self.env_name, self.seed, self.step, self.message)


def check_reward(result: StepResult, env_name: str, seed: int | None, step: int) -> StepResult:
    """``result``, or an :class:`EnvFault` of kind ``nonfinite`` when its reward is not a
    finite number; the fault names the parts (``info["rewards"]``, as reward functions
    report them) that were not."""
    try:
        ok = math.isfinite(float(result.reward))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        parts = result.info.get("rewards") if isinstance(result.info, dict) else None
        culprits = [f"reward {name!r} returned {value!r}" for name, value in (parts or {}).items()
                    if not isinstance(value, (int, float)) or not math.isfinite(value)]
        raise EnvFault("nonfinite", env_name, seed, step,
                       f"reward {result.reward!r}" + (f" ({'; '.join(culprits)})" if culprits else ""))
    return result


class GuardedEnv:
    """An environment in this process whose faults raise :class:`EnvFault`."""

    def __init__(self, env: Env, name: str) -> None:
        self._env, self.name = env, name
        self.instruction = env.instruction
        self.role_instructions = role_instructions_of(env)
        self.text_format = text_format_of(env)
        self.seed: int | None = None
        self.steps = 0

    def _fault(self, err: Exception) -> EnvFault:
        return EnvFault("error", self.name, self.seed, self.steps, first_line(err))

    def reset(self, seed: int) -> Observation:
        self.seed, self.steps = seed, 0
        try:
            return self._env.reset(seed)
        except Exception as err:
            raise self._fault(err) from err

    def step(self, action: str) -> StepResult:
        try:
            result = self._env.step(action)
        except Exception as err:
            raise self._fault(err) from err
        self.steps += 1
        return check_reward(result, self.name, self.seed, self.steps - 1)

    def legal_actions(self) -> list[str]:
        try:
            return self._env.legal_actions()
        except Exception as err:
            raise self._fault(err) from err

    def close(self) -> None:
        close = getattr(self._env, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # an environment that fails to close costs nothing
                pass


def guard(env: Env) -> Env:
    """``env`` with faults raised as :class:`EnvFault` (wrapped in a :class:`GuardedEnv`
    unless it is a guarded or remote environment already)."""
    if isinstance(env, (GuardedEnv, RemoteEnv)):
        return env
    return GuardedEnv(env, getattr(env, "name", type(env).__name__))


class _WorkerLost(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


class _Worker:
    """One worker process: a fresh interpreter running :func:`worker_main`, reached
    through a socket pair; it imports only the environment's own module (nothing of
    the parent's ``__main__``), with the parent's ``sys.path``."""

    def __init__(self, spec: EnvSpec) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.envs: dict[int, "RemoteEnv"] = {}
        self.proc: subprocess.Popen | None = None
        self.conn = None

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process and send it the environment (without waiting for it)."""
        parent, child = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "grpo_lab.envs.worker", str(child.fileno())],
                                     pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send(self.spec)

    def wait_ready(self) -> None:
        """Wait for the worker to confirm it can build the environment."""
        if not self.conn.poll(self.START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"an environment worker process did not start within {self.START_TIMEOUT_S} s")
        try:
            status, message = self.conn.recv()
        except EOFError:
            status, message = "error", f"the worker process exited with code {self.proc.wait()} while starting"
        if status != "ok":
            self.stop()
            raise RuntimeError(f"environment {self.spec.name!r}: {message}")

    START_TIMEOUT_S = 120.0

    def call(self, op: str, key: Hashable, arg: Any, timeout: float | None) -> Any:
        """The worker's answer; raises :class:`_WorkerLost` on a timeout or a dead worker
        and ``RuntimeError`` carrying the environment's own error line."""
        try:
            self.conn.send((op, key, arg))
            if not self.conn.poll(timeout):
                raise _WorkerLost("timeout", f"no answer within {timeout:g} s")
            status, value = self.conn.recv()
        except (EOFError, OSError) as err:
            try:
                code = self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                code = None
            raise _WorkerLost("error", f"the worker process died (exit code {code}; {type(err).__name__})") from None
        except _WorkerLost:
            raise
        except BaseException:  # interrupted (a signal) between request and answer: the connection is out of step
            self.stop()
            raise
        if status == "error":
            raise RuntimeError(value)
        return value

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.conn.close()
            self.proc = None


@dataclass
class PoolStats:
    """What keeping environments alive cost: workers replaced, environments rebuilt by
    replay (and their steps), those that could not be rebuilt, and seconds spent."""

    workers_replaced: int = 0
    envs_replayed: int = 0
    replayed_steps: int = 0
    envs_lost: int = 0
    replay_seconds: float = 0.0


class RemoteEnv:
    """A proxy of an environment in a worker process (made by :class:`EnvRunner`)."""

    def __init__(self, runner: "EnvRunner", worker: _Worker, key: int) -> None:
        self._runner, self._worker, self.key = runner, worker, key
        self.name = runner.spec.name
        self.instruction = runner.instruction
        self.role_instructions = runner.role_instructions
        self.text_format = runner.text_format
        self.seed: int | None = None
        self.actions: list[str] = []
        self.anchor: Hashable = None
        self.lost: str | None = None  # why the environment is gone (its worker was replaced and replay failed)

    @property
    def steps(self) -> int:
        return len(self.actions)

    def _call(self, op: str, arg: Any, on_ok: Callable[[Any], None] | None = None) -> Any:
        """The worker's answer to ``op``; ``on_ok`` records it in this proxy while the
        worker's lock is still held (a replacement worker replays from that record)."""
        name, timeout = self._runner.spec.name, self._runner.step_timeout_s
        with self._worker.lock:
            if self.lost is not None:
                raise EnvFault("error", name, self.seed, self.steps, self.lost)
            try:
                if self._worker.proc is None:
                    self._worker.start()
            except (RuntimeError, OSError) as err:
                raise EnvFault("error", name, self.seed, self.steps, f"no worker process: {first_line(err)}") from None
            try:
                value = self._worker.call(op, self.key, arg, timeout)
            except _WorkerLost as lost:
                self._runner._replace(self._worker, self)
                raise EnvFault(lost.kind, name, self.seed, self.steps, lost.message) from None
            except RuntimeError as err:
                raise EnvFault("error", name, self.seed, self.steps, str(err)) from None
            if on_ok is not None:
                on_ok(value)
            return value

    def reset(self, seed: int) -> Observation:
        def record(obs: Observation) -> None:
            self.seed, self.actions, self.anchor = int(seed), [], obs.anchor

        return self._call("reset", int(seed), record)

    def step(self, action: str) -> StepResult:
        def record(result: StepResult) -> None:
            self.actions.append(action)
            self.anchor = result.observation.anchor

        result = self._call("step", action, record)
        return check_reward(result, self._runner.spec.name, self.seed, self.steps - 1)

    def legal_actions(self) -> list[str]:
        return self._call("legal", None)

    def close(self) -> None:
        self._runner._forget(self)
        with self._worker.lock:
            if self._worker.proc is not None and self.lost is None:
                try:
                    self._worker.call("close", self.key, None, self._runner.step_timeout_s)
                except RuntimeError:  # the environment's own close failed: that costs nothing
                    pass
                except _WorkerLost:
                    self._runner._replace(self._worker, None)


class EnvRunner:
    """A factory of the run's environments (pass it where an ``env_factory`` goes).

    ``workers=0``: :class:`GuardedEnv` in this process. ``workers > 0``:
    :class:`RemoteEnv` proxies, spread over that many worker processes (started at first
    use, and again after :meth:`close`); ``step_timeout_s`` bounds every call (``None``:
    no bound)."""

    def __init__(self, spec: EnvSpec, workers: int = 0, step_timeout_s: float | None = 60.0) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if step_timeout_s is not None and step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be None or > 0, got {step_timeout_s}")
        self.spec, self.workers, self.step_timeout_s = spec, workers, step_timeout_s
        self.stats = PoolStats()
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._probed: tuple[str, TextFormat, tuple[str, ...]] | None = None
        if workers > 0:
            if getattr(spec.factory, "__module__", None) == "__main__":
                raise ValueError(
                    f"environment {spec.name!r} is defined in the script being run (__main__), which worker processes "
                    "do not import: move it to a module of its own and register it from there, or run environments in "
                    "process with rollout.env_workers=0")
            try:
                pickle.dumps(spec)
            except Exception as err:
                raise ValueError(
                    f"environment {spec.name!r} cannot be sent to worker processes ({first_line(err)}): register a "
                    "module-level class or function with picklable keyword arguments, or run environments in "
                    "process with rollout.env_workers=0") from None

    def start(self) -> None:
        """Start the worker processes now (they start at first use otherwise); raises
        ``RuntimeError`` naming the cause when the environment cannot be built there."""
        if self.workers == 0:
            return
        with self._lock:
            if not self._pool:
                self._pool = [_Worker(self.spec) for _ in range(self.workers)]
            pool = list(self._pool)
        starting = []
        for worker in pool:  # launch all, then wait: they start side by side
            with worker.lock:
                if worker.proc is None:
                    worker.launch()
                    starting.append(worker)
        for worker in starting:
            with worker.lock:
                worker.wait_ready()

    def _probe(self) -> tuple[str, TextFormat, tuple[str, ...]]:
        """The environment's instruction, text format and role instructions, read once
        from an instance built in this process."""
        if self._probed is None:
            env = GuardedEnv(self.spec.make(), self.spec.name)
            self._probed = (env.instruction, env.text_format, env.role_instructions)
            env.close()
        return self._probed

    @property
    def instruction(self) -> str:
        return self._probe()[0]

    @property
    def text_format(self) -> TextFormat:
        return self._probe()[1]

    @property
    def role_instructions(self) -> tuple[str, ...]:
        return self._probe()[2]

    def __call__(self) -> Env:
        if self.workers == 0:
            return GuardedEnv(self.spec.make(), self.spec.name)
        with self._lock:
            if not self._pool:
                self._pool = [_Worker(self.spec) for _ in range(self.workers)]
            worker = min(self._pool, key=lambda w: len(w.envs))
            env = RemoteEnv(self, worker, next(self._keys))
            worker.envs[env.key] = env
            return env

    def _forget(self, env: RemoteEnv) -> None:
        with self._lock:
            env._worker.envs.pop(env.key, None)

    def _replace(self, worker: _Worker, faulty: RemoteEnv | None) -> None:
        """Kill ``worker`` (its lock held by the caller), start a new one and rebuild its
        other environments there by replay; ``faulty`` is dropped."""
        t0 = time.perf_counter()
        worker.stop()
        self.stats.workers_replaced += 1
        with self._lock:
            if faulty is not None:
                worker.envs.pop(faulty.key, None)
                faulty.lost = "its worker process was replaced after this fault"
            survivors = [env for env in worker.envs.values() if env.seed is not None and env.lost is None]
        try:
            worker.start()
        except (RuntimeError, OSError) as err:  # no replacement: the survivors are lost, the next call tries again
            for env in survivors:
                env.lost = f"its worker process was replaced and the new one did not start: {first_line(err)}"
            self.stats.envs_lost += len(survivors)
            worker.proc = None
            return
        pending = survivors
        while pending:  # each pass either rebuilds every survivor or loses at least one
            for k, env in enumerate(pending):
                timeout = None if self.step_timeout_s is None else self.step_timeout_s * (1 + len(env.actions))
                try:
                    obs = worker.call("replay", env.key, (env.seed, list(env.actions)), timeout)
                    if obs.anchor != env.anchor:
                        raise RuntimeError(f"replay reached state {obs.anchor!r}, not {env.anchor!r} (is the "
                                           "environment deterministic in its seed?)")
                    self.stats.envs_replayed += 1
                    self.stats.replayed_steps += len(env.actions)
                except (_WorkerLost, RuntimeError) as err:
                    env.lost = f"its worker process was replaced and replaying its {len(env.actions)} steps failed: {err}"
                    self.stats.envs_lost += 1
                    if isinstance(err, _WorkerLost):  # the new worker is gone too: start again with the rest
                        worker.stop()
                        try:
                            worker.start()
                        except (RuntimeError, OSError) as start_err:
                            for other in survivors:
                                other.lost = other.lost or f"no worker process: {first_line(start_err)}"
                            worker.proc = None
                            break
                        pending = [e for e in survivors if e.lost is None]
                        break
            else:
                pending = []
        self.stats.replay_seconds += time.perf_counter() - t0

    def clear(self) -> None:
        """Drop every environment the workers hold (between rollouts)."""
        with self._lock:
            pool = list(self._pool)
        for worker in pool:
            with worker.lock:
                for env in worker.envs.values():
                    env.lost = "the rollout that made it is over"
                worker.envs.clear()
                if worker.proc is not None:
                    try:
                        worker.call("clear", None, None, self.step_timeout_s)
                    except (_WorkerLost, RuntimeError):
                        worker.stop()

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            pool, self._pool = self._pool, []
        for worker in pool:
            with worker.lock:
                worker.stop()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


__all__ = ["EnvFault", "EnvRunner", "EnvSpec", "GuardedEnv", "RemoteEnv", "PoolStats", "check_reward",
           "first_line", "guard", "FAULT_KINDS"]
