"""``python -m grpo_lab --list [NAME]``: every registry of named choices (estimators,
policy losses, packings, episode formats, backends, samplers, environments, rewards, ...)
with each entry's description and options, and the table of methods with their papers
and config lines (:mod:`grpo_lab.methods`); or the registry ``NAME`` (or ``methods``) alone."""

from __future__ import annotations

import argparse
from typing import Sequence

from . import advantages, build, envs, losses, methods  # noqa: F401  (each import fills its registries)
from .envs import rewards  # noqa: F401
from .registry import REGISTRIES
from .rollout import samplers  # noqa: F401
from .endpoint import tools  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_lab", description=__doc__)
    parser.add_argument("--list", nargs="?", const="", metavar="NAME",
                        help=f"print every registry, or the one named ({', '.join(sorted(REGISTRIES))})")
    args = parser.parse_args(argv)
    if args.list is None:
        parser.print_help()
        return 0
    if args.list and args.list not in REGISTRIES and args.list != "methods":
        parser.error(f"unknown registry {args.list!r}; valid names: {sorted(REGISTRIES) + ['methods']}")
    names = [args.list] if args.list else sorted(REGISTRIES) + ["methods"]
    print("\n\n".join(methods.describe() if name == "methods" else REGISTRIES[name].describe() for name in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
