"""Telling a local path from a hub name, before anything tries the hub."""

from __future__ import annotations

import os

#: endings of data files: a dataset name with one of these is a local file, never a hub id
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".zst", ".zip")


def looks_like_local_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """A name that can only be a local path: absolute, relative with ``.`` or ``~``, more
    than one ``/``, a backslash (a hub id is ``name`` or ``org/name``), or ending with
    one of ``suffixes``."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or os.path.isabs(name)
            or name.lower().endswith(suffixes))
