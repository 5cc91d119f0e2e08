"""Coefficients that follow a target across steps: the KL-in-reward coefficient (fixed, or
adaptive toward a target KL) and the adaptive entropy coefficient.

Each is a small object with ``value`` (what this step uses), ``observe(measured)``
(after the step) and ``state_dict`` / ``load_state_dict`` (kept in checkpoints, so a
resumed run continues with the coefficient it stopped at). Under data parallelism every
rank observes the same reduced measurement, so every rank holds the same coefficient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..registry import Registry


@dataclass
class FixedKL:
    """A constant coefficient."""

    value: float

    def observe(self, kl: float, rows: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: a fixed coefficient is the config's (a resume that changed
        ``algo.kl_reward_coef`` takes the new one)."""


@dataclass
class AdaptiveKL:
    """Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", as verl's
    ``AdaptiveKLController``: after each step, with ``e = clip(kl / target - 1, -0.2, 0.2)``
    (the measured mean per-token KL against the target),
    ``value *= 1 + e * rows / horizon`` (``rows``: the responses the KL was measured on)."""

    value: float
    target: float
    horizon: float

    def observe(self, kl: float, rows: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * rows / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The coefficient reached (target and horizon stay the config's)."""
        self.value = float(state["value"])


#: ``cls(value, target, horizon)`` by ``algo.kl_reward_controller``
KL_CONTROLLERS: Registry[type] = Registry("kl_controllers", "algo.kl_reward_controller", "KL coefficient controller",
                                          options=lambda cls: ())
KL_CONTROLLERS.register("fixed", lambda value, target, horizon: FixedKL(value),
                        description="A constant coefficient (algo.kl_reward_coef).")
KL_CONTROLLERS.register("adaptive", AdaptiveKL,
                        description="Toward algo.kl_target over algo.kl_horizon responses (Ziegler et al. 2019; "
                                    "verl's adaptive controller).")


@dataclass
class AdaptiveEntropy:
    """He et al. 2025, "Skywork Open Reasoner 1 Technical Report" (adaptive entropy
    control): a running ``c`` moves by ``step`` toward keeping the entropy at ``target``
    (``c += step`` when the entropy is below it, ``-= step`` above, never below 0), and
    the entropy bonus's coefficient is ``c`` while the entropy is at most the target, 0
    above it (the bonus only ever pulls entropy up to the target).

    Departure, stated: the entropy is the previous update's mean token entropy (measured
    in its forward passes), so the first step's coefficient is 0 (as the paper's
    ``c_0 = 0``); the paper measures the current batch's before its update."""

    target: float
    step: float
    c: float = 0.0
    last_entropy: float | None = None

    @property
    def value(self) -> float:
        return self.c if self.last_entropy is not None and self.last_entropy <= self.target else 0.0

    def observe(self, entropy: float) -> None:
        if entropy < self.target:
            self.c += self.step
        elif entropy > self.target:
            self.c = max(self.c - self.step, 0.0)
        self.last_entropy = float(entropy)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c, self.last_entropy = float(state["c"]), state["last_entropy"]
