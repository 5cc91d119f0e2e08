"""Text environments for agent RL (``grpo_lab.envs``).

Every environment follows :class:`~grpo_lab.envs.base.Env`. Environments are created by
name, so a config can say ``env.name=frozenlake``. Three ways to add one:

- ``@register_env("name")`` on a class or factory function in your own code (or
  ``register_env("name", factory)``), imported before the run starts;
- an entry point in the ``grpo_lab.envs`` group of an installed package
  (``[project.entry-points."grpo_lab.envs"] name = "my_pkg.envs:MyEnv"``), loaded the
  first time a name is looked up;
- a module in this package, registered below.

A factory takes the environment's keyword arguments (``env.kwargs``) and returns a new
environment. With ``rollout.env_workers > 0`` environments run in worker processes, so
the factory must be importable by its module and name (a module-level class or function,
not a lambda).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar, overload

from .base import Env, Observation, StepResult
from .frozenlake import FrozenLakeEnv
from .sokoban import SokobanEnv

ENTRY_POINT_GROUP = "grpo_lab.envs"

_ENVS: dict[str, Callable[..., Env]] = {}
_entry_points_loaded = False

F = TypeVar("F", bound=Callable[..., Env])


@overload
def register_env(name: str) -> Callable[[F], F]: ...
@overload
def register_env(name: str, factory: F) -> F: ...


def register_env(name: str, factory: Callable[..., Env] | None = None):
    """Register ``factory`` (a class or a function returning an :class:`Env`) as
    ``name``; usable as a decorator. A name registered twice raises ``ValueError``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an environment name must be a non-empty string, got {name!r}")

    def add(f: F) -> F:
        if not callable(f):
            raise TypeError(f"register_env({name!r}, ...): the factory must be callable, got {f!r}")
        if name in _ENVS:
            raise ValueError(f"environment {name!r} is already registered (by {_qualname(_ENVS[name])}); "
                             "choose another name")
        _ENVS[name] = f
        return f

    return add if factory is None else add(factory)


def unregister_env(name: str) -> None:
    """Remove ``name`` from the registry (tests and notebooks that re-register)."""
    _ENVS.pop(name, None)


def _qualname(f: Any) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def _load_entry_points() -> None:
    """Register the environments that installed packages declare in the
    ``grpo_lab.envs`` entry-point group (once; a name taken already is skipped)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _ENVS:
            _ENVS[ep.name] = ep.load()


def get_env_factory(name: str) -> Callable[..., Env]:
    """The factory registered as ``name``; an unknown name raises ``ValueError`` listing
    the valid ones."""
    if name not in _ENVS:
        _load_entry_points()
    if name not in _ENVS:
        raise ValueError(f"unknown environment {name!r}; valid names: {env_names()}")
    return _ENVS[name]


def make_env(name: str, **kwargs: Any) -> Env:
    """Build the environment registered as ``name`` with its keyword arguments."""
    return get_env_factory(name)(**kwargs)


def env_names() -> list[str]:
    _load_entry_points()
    return sorted(_ENVS)


register_env("frozenlake", FrozenLakeEnv)
register_env("sokoban", SokobanEnv)

__all__ = ["Env", "Observation", "StepResult", "FrozenLakeEnv", "SokobanEnv", "make_env", "env_names", "register_env",
           "unregister_env", "get_env_factory", "ENTRY_POINT_GROUP"]
