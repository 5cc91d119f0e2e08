"""Text environments for agent RL (``grpo_lab.envs``).

Every environment follows :class:`~grpo_lab.envs.base.Env`. Environments are created by
name, so a config can say ``env.name=frozenlake``. Three ways to add one:

- ``@register_env("name")`` on a class or factory function in your own code (or
  ``register_env("name", factory)``), imported before the run starts;
- an entry point in the ``grpo_lab.envs`` group of an installed package
  (``[project.entry-points."grpo_lab.envs"] name = "my_pkg.envs:MyEnv"``), loaded the
  first time a name is looked up;
- a module in this package, registered below by its import path (``"module:attribute"``,
  imported at first use, so an environment's optional packages load only when it runs).

``python -m grpo_lab.envs --list`` lists every environment with its options.

A factory takes the environment's keyword arguments (``env.kwargs``) and returns a new
environment. With ``rollout.env_workers > 0`` environments run in worker processes, so
the factory must be importable by its module and name (a module-level class or function,
not a lambda).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, TypeVar, overload

from ..registry import Registry
from .base import ACTION_FORMAT, Env, Observation, StepResult, TextFormat, text_format_of
from .frozenlake import FrozenLakeEnv
from .sokoban import SokobanEnv

ENTRY_POINT_GROUP = "grpo_lab.envs"


def _check_factory(name: str, factory: Any) -> None:
    if not callable(factory):
        raise TypeError(f"register_env({name!r}, ...): the factory must be callable, got {factory!r}")


def _describe(factory: Any) -> str:
    """The first line of the factory's docstring, or of its module's when it defers to it."""
    doc = (inspect.getdoc(factory) or "").strip()
    if not doc or doc.startswith("See the module docstring"):
        doc = inspect.getdoc(sys.modules.get(getattr(factory, "__module__", ""), None)) or ""
    return doc.splitlines()[0].strip() if doc.strip() else ""


def _options(factory: Any) -> tuple[str, ...]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(f"{p.name}={p.default!r}" if p.default is not p.empty else f"{p.name} (required)" for p in params
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


#: environment factories by ``env.name`` (entry-point group ``grpo_lab.envs``)
ENVS: Registry[Callable[..., Env]] = Registry("envs", "env.name", "environment", options=_options, check=_check_factory,
                                              describe=_describe)

F = TypeVar("F", bound=Callable[..., Env])


@overload
def register_env(name: str) -> Callable[[F], F]: ...
@overload
def register_env(name: str, factory: F) -> F: ...


@overload
def register_env(name: str, factory: str) -> str: ...


def register_env(name: str, factory: Callable[..., Env] | str | None = None):
    """Register ``factory`` (a class or a function returning an :class:`Env`, or its
    import path ``"package.module:attribute"``, imported at first use) as ``name``; usable
    as a decorator. A name registered twice raises ``ValueError``."""
    return ENVS.register(name, factory)


def unregister_env(name: str) -> None:
    """Remove ``name`` from the registry (tests and notebooks that re-register)."""
    ENVS.unregister(name)


def get_env_factory(name: str) -> Callable[..., Env]:
    """The factory registered as ``name``; an unknown name raises ``ValueError`` listing
    the valid ones."""
    return ENVS.get(name)


def make_env(name: str, /, **kwargs: Any) -> Env:
    """Build the environment registered as ``name`` with its keyword arguments."""
    return get_env_factory(name)(**kwargs)


def env_options(name: str) -> tuple[list[inspect.Parameter], bool]:
    """The keyword options (``env.kwargs``) of environment ``name``'s factory, in order,
    and whether it takes other keywords too (``**kwargs``, or no signature to read)."""
    try:
        params = list(inspect.signature(get_env_factory(name)).parameters.values())
    except (TypeError, ValueError):  # a factory without a signature (a builtin)
        return [], True
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def env_names() -> list[str]:
    return ENVS.names()


register_env("frozenlake", FrozenLakeEnv)
register_env("sokoban", SokobanEnv)
register_env("countdown", "grpo_lab.envs.countdown:CountdownEnv")
register_env("dataset", "grpo_lab.envs.dataset:DatasetEnv")
register_env("search_qa", "grpo_lab.envs.search_qa:SearchQAEnv")
register_env("search_team", "grpo_lab.envs.search_team:SearchTeamEnv")
register_env("tool_calls", "grpo_lab.envs.tool_calls:ToolCallsEnv")
register_env("textworld", "grpo_lab.envs.textworld_games:TextWorldEnv")
register_env("alfworld", "grpo_lab.envs.alfworld:ALFWorldEnv")
register_env("webshop", "grpo_lab.envs.webshop:WebShopEnv")

__all__ = ["Env", "Observation", "StepResult", "TextFormat", "ACTION_FORMAT", "text_format_of", "FrozenLakeEnv",
           "SokobanEnv", "make_env", "env_names", "env_options", "register_env", "unregister_env", "get_env_factory",
           "ENTRY_POINT_GROUP", "ENVS"]
