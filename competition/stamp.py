"""Input stamps: skip a derived output (a report, a figure) when nothing it was made from changed.

A stamp is a JSON file next to the output that records a fingerprint of every input file (content
hash for files up to `HASH_LIMIT`, size and modification time for bigger ones such as checkpoints)
and of the options. Content hashes matter: earlier stages rewrite identical plots and tables on a
rerun, which changes their mtime but not what they say.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from competition.atomic import write_json

HASH_LIMIT = 64 * 2**20  # bytes; bigger files are fingerprinted by size and mtime


def _digest(path: Path | str, digest) -> str:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    """The file's sha256 (hex): what a bundle's manifest and the submissions log record."""
    return _digest(path, hashlib.sha256())


def _file_print(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASH_LIMIT:
        return f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
    return _digest(path, hashlib.blake2b(digest_size=16))


def fingerprint(files: Iterable[Path], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the output depends on: each existing file's fingerprint (by path) and the options."""
    found = sorted({Path(f) for f in files if Path(f).is_file()})
    return {"files": {str(f): _file_print(f) for f in found}, "options": options or {}}


def is_current(stamp: Path, outputs: Iterable[Path], files: Iterable[Path], options: dict[str, Any] | None = None) -> bool:
    """True when every output exists and the stamp records exactly these inputs and options."""
    if not stamp.is_file() or not all(Path(o).is_file() for o in outputs):
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == fingerprint(files, options)


def write_stamp(stamp: Path, files: Iterable[Path], options: dict[str, Any] | None = None) -> None:
    write_json(stamp, fingerprint(files, options))
