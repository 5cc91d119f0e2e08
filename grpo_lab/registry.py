"""One registry type for every named choice of a run.

An estimator, a policy loss, a packing, an episode format, a backend, a sampler, an
environment: each is chosen in the config by a name, and each name is resolved once,
when the config is validated, into the object it names; nothing below the entry point
reads the name again.

    ESTIMATORS = Registry("estimator", "algo.estimator")

    @ESTIMATORS.register("grpo")
    def grpo(inputs, *, scale_rewards="group"): ...

    ESTIMATORS.get("grpo")  # the function

A name registered twice raises :class:`DuplicateNameError`; an unknown name raises
:class:`UnknownNameError` listing the valid ones. An entry carries a one-line
description (its docstring's first line unless given) and its options (the keyword
parameters of a function or class unless given). An entry may be an import path
``"package.module:attribute"``, imported at first use, so that an entry's optional
packages load only when it is chosen.

Plugins: an installed package adds entries through the entry-point group
``grpo_lab.<registry name>`` (``[project.entry-points."grpo_lab.envs"] maze =
"my_pkg.maze:MazeEnv"``), read the first time a registry lists its names or misses one.
``python -m grpo_lab --list`` prints every registry (:data:`REGISTRIES`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

ENTRY_POINT_PREFIX = "grpo_lab."


class UnknownNameError(KeyError, ValueError):
    """A name no entry of a registry has; the message lists the valid names. A
    ``KeyError`` (a lookup that failed) and a ``ValueError`` (a bad config value)."""

    def __str__(self) -> str:  # not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):
    """A name registered twice in one registry."""


def first_line(obj: Any) -> str:
    """The first line of ``obj``'s docstring ('' without one)."""
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0].strip() if doc.strip() else ""


def keyword_options(obj: Any) -> tuple[str, ...]:
    """``name=default`` (or ``name`` when required) for each keyword-only parameter of a
    function, or each parameter of a class's constructor; ``()`` without a signature."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.KEYWORD_ONLY,) if not inspect.isclass(obj) else (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params if p.kind in kinds)


@dataclass
class Entry(Generic[T]):
    """One registered name: its object (or the import path it is loaded from), a one-line
    description and its options."""

    name: str
    target: T | str
    description: str = ""
    options: tuple[str, ...] | None = None  # None: read from the object when it is loaded

    @property
    def loaded(self) -> bool:
        return not isinstance(self.target, str)

    @property
    def where(self) -> str:
        if isinstance(self.target, str):
            return self.target.replace(":", ".")
        return f"{getattr(self.target, '__module__', '?')}.{getattr(self.target, '__qualname__', type(self.target).__name__)}"


def import_path(path: str) -> Any:
    """The attribute an import path ``"package.module:attribute"`` names, its module
    imported (``ImportError``, ``AttributeError`` as Python raises them)."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


#: every registry, by name (``python -m grpo_lab --list``)
REGISTRIES: dict[str, "Registry"] = {}


class Registry(Generic[T]):
    """Names to objects of one kind.

    Args:
        name: the registry's name (``estimators``); also the entry-point group
            ``grpo_lab.<name>`` that plugins register through.
        key: the config key that chooses from it (``algo.estimator``).
        kind: what one entry is, in words (``advantage estimator``), for messages.
        options: reads an entry's options from its object (default
            :func:`keyword_options`).
        check: called with each object when it is registered or loaded; raises
            ``TypeError`` for an object that is not of the registry's kind.
        describe: an entry's one-line description when none is given (default: its
            docstring's first line).
    """

    def __init__(self, name: str, key: str, kind: str, options: Callable[[Any], tuple[str, ...]] = keyword_options,
                 check: Callable[[str, Any], None] | None = None, describe: Callable[[Any], str] = first_line) -> None:
        if name in REGISTRIES:
            raise DuplicateNameError(f"a registry named {name!r} exists already")
        self.name, self.key, self.kind = name, key, kind
        self._options, self._check, self._describe = options, check, describe
        self._entries: dict[str, Entry[T]] = {}
        self._plugins_read = False
        REGISTRIES[name] = self

    # ------------------------------------------------------------------ registering
    def register(self, name: str, target: T | str | None = None, *, description: str | None = None,
                 options: tuple[str, ...] | None = None):
        """Register ``target`` (an object, or its import path ``"package.module:attribute"``)
        as ``name``; without ``target``, a decorator. Returns the target."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(obj):
            if isinstance(obj, str):
                if obj.count(":") != 1 or not all(obj.split(":")):
                    raise ValueError(f"{self.name}: {name!r} -> {obj!r}: an import path reads 'package.module:attribute'")
            elif self._check is not None:
                self._check(name, obj)
            if name in self._entries:
                raise DuplicateNameError(f"{self.kind} {name!r} is already registered (by {self._entries[name].where}); "
                                         "choose another name")
            text = description if description is not None else ("" if isinstance(obj, str) else self._describe(obj))
            self._entries[name] = Entry(name, obj, text, options)
            return obj

        return add if target is None else add(target)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and notebooks that register again)."""
        self._entries.pop(name, None)

    def refresh_plugins(self) -> None:
        """Read the entry-point group again at the next lookup (after installing a plugin)."""
        self._plugins_read = False

    def registered(self, name: str) -> Entry[T]:
        """The entry of ``name`` as registered, without importing an import-path entry;
        :class:`UnknownNameError` listing the valid names when there is none."""
        if isinstance(name, str) and name not in self._entries:
            self._read_plugins()
        if not isinstance(name, str) or name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {self.names()}")
        return self._entries[name]

    def _read_plugins(self) -> None:
        """Register the entries that installed packages declare in the entry-point group
        ``grpo_lab.<name>`` (once; a name taken already is skipped)."""
        if self._plugins_read:
            return
        self._plugins_read = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_PREFIX + self.name):
            if ep.name not in self._entries:
                value = ep.value if ep.value.count(":") == 1 and " " not in ep.value else ep.load()
                self.register(ep.name, value)

    # ------------------------------------------------------------------ looking up
    def names(self) -> list[str]:
        """Every registered name, sorted (plugins included)."""
        self._read_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``, its object loaded; :class:`UnknownNameError` listing the
        valid names when there is none."""
        entry = self.registered(name)
        if isinstance(entry.target, str):
            entry.target = self._load(name, entry.target)
            if not entry.description:
                entry.description = self._describe(entry.target)
        return entry

    def get(self, name: str) -> T:
        """The object registered as ``name`` (:meth:`entry`)."""
        return self.entry(name).target

    __getitem__ = get

    def _load(self, name: str, path: str) -> T:
        module, attribute = path.split(":")
        try:
            obj = import_path(path)
        except ImportError as err:
            raise ImportError(f"{self.kind} {name!r} could not be imported from {path}: {err}") from err
        except AttributeError:
            raise ImportError(f"{self.kind} {name!r}: module {module} has no attribute {attribute!r}") from None
        if self._check is not None:
            self._check(name, obj)
        return obj

    def options(self, name: str) -> tuple[str, ...]:
        """The options of ``name``: given at registration, or read from its object."""
        entry = self.entry(name)
        return entry.options if entry.options is not None else self._options(entry.target)

    def descriptions(self) -> dict[str, str]:
        """``{name: one-line description}`` of the entries loaded or described already
        (an import-path entry is not imported for this)."""
        self._read_plugins()
        return {name: self._entries[name].description for name in sorted(self._entries)}

    def describe(self, name: str | None = None) -> str:
        """The listing of one entry, or of every entry: name, description, options (or why
        an entry cannot be loaded here)."""
        names = [name] if name is not None else self.names()
        lines = [f"{self.name} ({self.key}):"] if name is None else []
        for n in names:
            try:
                entry = self.entry(n)
            except ImportError as err:
                lines += [f"  {n}  ({self._entries[n].where})", f"      unavailable here: {str(err).splitlines()[0]}"]
                continue
            lines.append(f"  {n}  {entry.description}".rstrip())
            options = self.options(n)
            lines.append(f"      options: {', '.join(options) if options else 'none'}")
        return "\n".join(lines)
