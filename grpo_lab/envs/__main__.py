"""``python -m grpo_lab.envs --list``: every registered environment with its options."""

from __future__ import annotations

import argparse
from typing import Sequence

from . import ENVS, env_names


def describe(name: str) -> str:
    """A few lines on one environment: where it lives, its first docstring line, and its
    keyword options with their defaults (or why it cannot be imported here)."""
    where = ENVS.registered(name).where
    try:
        entry = ENVS.entry(name)
    except ImportError as err:
        return f"{name}  ({where})\n    unavailable here: {str(err).splitlines()[0]}"
    lines = [f"{name}  ({entry.where})"]
    if entry.description:
        lines.append(f"    {entry.description}")
    options = ENVS.options(name)
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
