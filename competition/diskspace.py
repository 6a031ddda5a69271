"""Free-space check before a large write, so a full disk is one line up front, not a crash midway."""
from __future__ import annotations

import shutil
from pathlib import Path

from competition.failures import FixableError, human_bytes

MARGIN = 1 << 26  # 64 MiB kept free beside the write (temporary files, tables, logs)


class NotEnoughSpaceError(FixableError):
    """The disk that would receive a write has too little free space."""


def existing_folder(path: Path | str) -> Path:
    """``path`` itself if it is a folder, else its nearest existing ancestor."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_free_space(path: Path | str, needed_bytes: int, what: str = "this write", margin: int = MARGIN,
                     elsewhere: str = "WORK= (--work)") -> int:
    """Raise :class:`NotEnoughSpaceError` unless the disk of ``path`` has ``needed_bytes`` (+ margin)
    free; returns the free bytes. ``needed_bytes`` is what is still to be written, not the total;
    ``elsewhere`` is the option that moves the write to another disk."""
    folder = existing_folder(path)
    free = shutil.disk_usage(folder).free
    if needed_bytes > 0 and free < needed_bytes + margin:
        raise NotEnoughSpaceError(
            f"{what} needs {human_bytes(needed_bytes)} (and {human_bytes(margin)} to spare) in {folder} but only "
            f"{human_bytes(free)} is free; free space "
            f"there or point {elsewhere} at a larger disk, then run the same command again: finished work is kept"
        )
    return free

