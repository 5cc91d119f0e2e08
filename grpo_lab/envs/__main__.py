"""``python -m grpo_lab.envs --list``: every registered environment with its options."""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Sequence

from . import _ENVS, env_names, env_options, get_env_factory


def describe(name: str) -> str:
    """A few lines on one environment: where it lives, its first docstring line, and its
    keyword options with their defaults (or why it cannot be imported here)."""
    registered = _ENVS.get(name)
    where = registered.replace(":", ".") if isinstance(registered, str) else None
    try:
        factory = get_env_factory(name)
    except ImportError as err:
        return f"{name}  ({where})\n    unavailable here: {str(err).splitlines()[0]}"
    where = where or f"{factory.__module__}.{getattr(factory, '__qualname__', factory)}"
    module_doc = inspect.getdoc(sys.modules.get(factory.__module__)) or ""
    doc = (inspect.getdoc(factory) or "").strip()
    if not doc or doc.startswith("See the module docstring"):
        doc = module_doc
    lines = [f"{name}  ({where})"]
    if doc:
        lines.append(f"    {doc.splitlines()[0]}")
    options = [f"{p.name}={p.default!r}" if p.default is not p.empty else f"{p.name} (required)"
               for p in env_options(name)[0]]
    lines.append("    options (env.kwargs): " + (", ".join(options) if options else "none"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grpo_lab.envs", description=__doc__)
    parser.add_argument("--list", action="store_true", help="list the environments and their options")
    parser.add_argument("name", nargs="?", help="describe this environment only")
    args = parser.parse_args(argv)
    if not args.list and not args.name:
        parser.print_help()
        return
    names = [args.name] if args.name else env_names()
    if args.name and args.name not in env_names():
        parser.error(f"unknown environment {args.name!r}; valid names: {env_names()}")
    print("\n\n".join(describe(n) for n in names))


if __name__ == "__main__":
    main()
