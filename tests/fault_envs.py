"""Environments that fail on purpose, for the fault-tolerance tests. A module of its own
(light imports) so that environment worker processes can import it by name."""

from __future__ import annotations

import os
import signal
import time
import zlib

from grpo_lab.envs import FrozenLakeEnv
from grpo_lab.envs.base import Observation, StepResult


def draw(*parts) -> float:
    """A number in [0, 1) fixed by ``parts`` (so a fault is a function of the episode's
    seed and actions, and replays the same way)."""
    return zlib.crc32(repr(parts).encode()) / 2**32


class FaultyLake(FrozenLakeEnv):
    """FrozenLake whose steps fail with the given probabilities, decided by a hash of
    (seed, step, action): ``error_rate`` raises, ``nan_rate`` returns a NaN reward,
    ``hang_rate`` sleeps ``hang_seconds``; ``reset_error_rate`` raises in ``reset``."""

    def __init__(self, error_rate=0.0, nan_rate=0.0, hang_rate=0.0, hang_seconds=3600.0, reset_error_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.rates = (error_rate, nan_rate, hang_rate)
        self.hang_seconds, self.reset_error_rate = hang_seconds, reset_error_rate

    def reset(self, seed):
        self._seed, self._steps = seed, 0
        if draw("reset", seed) < self.reset_error_rate:
            raise ValueError(f"no level for seed {seed}\n(a second line that the log leaves out)")
        return super().reset(seed)

    def step(self, action):
        u = draw(self._seed, self._steps, action)
        self._steps += 1
        error, nan, hang = self.rates
        if u < error:
            raise RuntimeError(f"simulator crashed on {action!r}\ntraceback details")
        if u < error + hang:
            time.sleep(self.hang_seconds)
        result = super().step(action)
        if u < error + hang + nan:
            return StepResult(result.observation, float("nan"), result.done, result.info)
        return result


class Corridor:
    """Positions 0..4 from ``seed % 3``; ``right`` moves on, ``wait`` stays. Faults by
    (seed, position): ``raise_at``, ``nan_at``, ``hang_at``, ``die_at`` hold
    ``(seed, position)`` pairs where the step from that position fails that way."""

    instruction = "Reach 4."

    def __init__(self, raise_at=(), nan_at=(), hang_at=(), die_at=(), reset_raises=(), pad_words=0, pad_at=()):
        self.raise_at, self.nan_at = {tuple(x) for x in raise_at}, {tuple(x) for x in nan_at}
        self.hang_at, self.die_at = {tuple(x) for x in hang_at}, {tuple(x) for x in die_at}
        self.reset_raises, self.pad_words, self.pad_at = set(reset_raises), pad_words, {tuple(x) for x in pad_at}

    def _obs(self):
        text = f"at {self.pos}"
        if (self.seed, self.pos) in self.pad_at:
            text += " " + " ".join(["far"] * self.pad_words)
        return Observation(text, ("corridor", self.seed, self.pos))

    def reset(self, seed):
        if seed in self.reset_raises:
            raise KeyError(f"seed {seed}")
        self.seed, self.pos = seed, seed % 3
        return self._obs()

    def legal_actions(self):
        return ["right", "wait"]

    def step(self, action):
        here = (self.seed, self.pos)
        if here in self.raise_at:
            raise RuntimeError(f"broken at {here}\nmore")
        if here in self.hang_at:
            time.sleep(3600)
        if here in self.die_at:
            os._exit(3)
        if action not in self.legal_actions():
            return StepResult(self._obs(), 0.0, False, {"won": False, "valid_action": False})
        self.pos += action == "right"
        won = self.pos == 4
        reward = float("nan") if here in self.nan_at else float(won)
        return StepResult(self._obs(), reward, won, {"won": won, "valid_action": True})


class SigtermLake(FrozenLakeEnv):
    """FrozenLake that sends SIGTERM to its own process at the ``ARMED``-th step taken
    in this process (0: never). In process only (``rollout.env_workers=0``)."""

    ARMED = 0
    steps_taken = 0

    @classmethod
    def steps_at_each_rollout(cls, monkeypatch) -> list[int]:
        """The list ``steps_taken`` is appended to as each rollout (``Trainer.collect``)
        begins: where to arm the signal to land inside a given step's rollout."""
        from grpo_lab.trainer import Trainer  # here: worker processes import this module by name

        starts, original = [], Trainer.collect

        def counting(self, step):
            starts.append(cls.steps_taken)
            return original(self, step)

        monkeypatch.setattr(Trainer, "collect", counting)
        return starts

    def step(self, action):
        SigtermLake.steps_taken += 1
        if SigtermLake.ARMED and SigtermLake.steps_taken == SigtermLake.ARMED:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().step(action)


class VerboseLake(FrozenLakeEnv):
    """FrozenLake whose observations carry ``pad_words`` extra words in the episodes of
    seeds divisible by ``every`` (a long tool output, a web page)."""

    def __init__(self, pad_words=0, every=2, **kwargs):
        super().__init__(**kwargs)
        self.pad_words, self.every = pad_words, every

    def _pad(self, obs):
        if self._seed % self.every == 0:
            return Observation(obs.text + "\n" + " ".join(["ice"] * self.pad_words), obs.anchor)
        return obs

    def reset(self, seed):
        self._seed = seed
        return self._pad(super().reset(seed))

    def step(self, action):
        result = super().step(action)
        return StepResult(self._pad(result.observation), result.reward, result.done, result.info)
