"""Atomic writes: a file is either absent or whole, never half written.

Each writer fills a hidden temporary file next to the target and renames it over the target
(``os.replace`` is atomic on POSIX), so a run killed mid-write, or a write that fails on a full
disk, leaves at most a ``.<name>.tmp-*`` file that nothing reads. Temporary names are unique per
call (pid and a random part), so two runs writing the same target never share one.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_parquet(path: Path | str, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv(path: Path | str, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def remove_stale_temporaries(directory: Path | str) -> None:
    """Delete ``.*.tmp-*`` leftovers of a killed run (they are never read)."""
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.rglob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
