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

import importlib
import inspect
from typing import Any, Callable, TypeVar, Union, overload

from .base import ACTION_FORMAT, Env, Observation, StepResult, TextFormat, text_format_of
from .frozenlake import FrozenLakeEnv
from .sokoban import SokobanEnv

ENTRY_POINT_GROUP = "grpo_lab.envs"

_ENVS: dict[str, Union[Callable[..., Env], str]] = {}  # a factory, or its "module:attribute" path
_entry_points_loaded = False

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
    if not isinstance(name, str) or not name:
        raise ValueError(f"an environment name must be a non-empty string, got {name!r}")

    def add(f: F) -> F:
        if isinstance(f, str):
            if f.count(":") != 1 or not all(f.split(":")):
                raise ValueError(f"register_env({name!r}, {f!r}): an import path must read 'package.module:attribute'")
        elif not callable(f):
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
    if isinstance(f, str):
        return f.replace(":", ".")
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def _resolve(name: str, path: str) -> Callable[..., Env]:
    module, attribute = path.split(":")
    try:
        factory = getattr(importlib.import_module(module), attribute)
    except ImportError as err:
        raise ImportError(f"environment {name!r} could not be imported from {path}: {err}") from err
    except AttributeError:
        raise ImportError(f"environment {name!r}: module {module} has no attribute {attribute!r}") from None
    if not callable(factory):
        raise TypeError(f"environment {name!r}: {path} is not callable")
    return factory


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
            _ENVS[ep.name] = ep.value if ep.value.count(":") == 1 and " " not in ep.value else ep.load()


def get_env_factory(name: str) -> Callable[..., Env]:
    """The factory registered as ``name``; an unknown name raises ``ValueError`` listing
    the valid ones."""
    if name not in _ENVS:
        _load_entry_points()
    if name not in _ENVS:
        raise ValueError(f"unknown environment {name!r}; valid names: {env_names()}")
    factory = _ENVS[name]
    if isinstance(factory, str):
        factory = _ENVS[name] = _resolve(name, factory)
    return factory


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
    _load_entry_points()
    return sorted(_ENVS)


register_env("frozenlake", FrozenLakeEnv)
register_env("sokoban", SokobanEnv)
register_env("countdown", "grpo_lab.envs.countdown:CountdownEnv")
register_env("dataset", "grpo_lab.envs.dataset:DatasetEnv")
register_env("search_qa", "grpo_lab.envs.search_qa:SearchQAEnv")
register_env("textworld", "grpo_lab.envs.textworld_games:TextWorldEnv")
register_env("alfworld", "grpo_lab.envs.alfworld:ALFWorldEnv")
register_env("webshop", "grpo_lab.envs.webshop:WebShopEnv")

__all__ = ["Env", "Observation", "StepResult", "TextFormat", "ACTION_FORMAT", "text_format_of", "FrozenLakeEnv",
           "SokobanEnv", "make_env", "env_names", "env_options", "register_env", "unregister_env", "get_env_factory",
           "ENTRY_POINT_GROUP"]
