"""One run at a time per work-folder stage: ``with stage_lock(work, "prepare"): ...``.

The lock is ``fcntl.flock`` on ``<work>/.locks/<stage>.lock``: the kernel releases it when the
holder exits or is killed, so a dead run never leaves it stuck. The file holds who took it (pid,
host, start time, command), which a second run reports instead of racing the first.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from competition.failures import FixableError
from competition.pools import pid_alive

_held: dict[str, int] = {}  # lock path -> nesting depth in this process (flock is per open file)


class LockHeldError(FixableError):
    """Another live run holds the stage's lock."""


def lock_path(work_root: Path | str, stage: str) -> Path:
    return Path(work_root) / ".locks" / f"{stage}.lock"


def _holder_text(fd: int, path: Path) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    pid, host = info.get("pid", "?"), info.get("host", "?")
    text = f"another run holds {path}, started at {info.get('started', '?')}, pid {pid} on {host}"
    if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        text += " (that process is gone: a process it started still holds the lock; stop it)"
    return text


@contextlib.contextmanager
def stage_lock(work_root: Path | str, stage: str) -> Iterator[Path]:
    """Hold the lock of ``stage`` in ``work_root`` (re-entrant within a process) or raise
    :class:`LockHeldError` naming the holder. Under torchrun only rank 0 takes it."""
    path = lock_path(work_root, stage)
    key = str(path.absolute())
    if key in _held or os.environ.get("RANK", "0") != "0":
        # Already ours (`prepare` calling `metadata`), or a non-zero rank of a torchrun job whose
        # rank 0 holds it for the whole job.
        _held[key] = _held.get(key, 0) + 1
        try:
            yield path
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeldError(f"{_holder_text(fd, path)}; wait for it to finish, or stop it and run again") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[key] = 1
        try:
            yield path
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def file_lock(path: Path | str) -> Iterator[None]:
    """Wait for, then hold, a short exclusive lock on ``path`` (``.locks/<name>.lock`` beside it):
    for a read-modify-write of a file that concurrent runs share."""
    lock = lock_path(Path(path).parent, Path(path).name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
