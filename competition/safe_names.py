"""One rule for a file name read from a file we did not write ourselves (a bundle's members, the
names inside a fitted level 2's manifest): a plain relative name that stays inside its folder.

Used by ``prediction.bundle`` (archive members and the fitted names they must match) and
``level2_stacking.fitted`` (the files its manifest names), so the two cannot drift apart.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath


def safe_relative_name(name: object) -> str | None:
    """``name`` as a POSIX relative path when it is a non-empty string naming something below a
    folder (no backslash, not absolute, no ``.`` or ``..`` part, before any normalisation); else None."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return None
    pure = PurePosixPath(name)
    if pure.is_absolute() or not pure.parts or any(part in ("..", ".") for part in name.split("/")):
        return None
    return pure.as_posix()


def path_inside(root: Path, name: object) -> Path | None:
    """``root / name`` when ``name`` is a safe relative name that, links followed, still resolves
    inside ``root``; else None."""
    safe = safe_relative_name(name)
    if safe is None:
        return None
    target = Path(root) / safe
    return target if target.resolve().is_relative_to(Path(root).resolve()) else None
