"""The bad-files list: files a batch pass could not use, recorded so the run carries on."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from competition.atomic import write_csv
from competition.locks import file_lock

COLUMNS = ["image_id", "path", "stage", "reason"]


def record_bad_files(csv_path: Path | str, rows: Iterable[dict], stage: str) -> pd.DataFrame:
    """Merge ``rows`` (image_id, path, reason) into the list for ``stage``; returns the whole list.

    Each stage's entries are replaced, not appended, so a rerun does not duplicate them. The
    read-modify-write holds a lock, so concurrent stages (metadata, caches of two sizes) keep
    each other's entries.
    """
    csv_path = Path(csv_path)
    new = pd.DataFrame(list(rows), columns=["image_id", "path", "reason"]).assign(stage=stage)[COLUMNS]
    with file_lock(csv_path):
        old = read_bad_files(csv_path)
        table = pd.concat([old[old["stage"] != stage], new], ignore_index=True).sort_values(["stage", "image_id"])
        write_csv(csv_path, table)
    return table


def read_bad_files(csv_path: Path | str) -> pd.DataFrame:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(csv_path, dtype=str)


NOTE_COLUMNS = ["path", "stage", "note"]
NOTES_NAME = "reader_notes.csv"  # beside bad_files.csv: files used, with a convention the reader applied


def record_notes(csv_path: Path | str, rows: Iterable[tuple[str, str]], stage: str,
                 reread: set[str] | None = None) -> pd.DataFrame:
    """Replace ``stage``'s (path, note) rows in the notes list, as :func:`record_bad_files`; with
    ``reread``, only the rows of those paths (an incremental pass read only them)."""
    csv_path = Path(csv_path)
    new = pd.DataFrame(list(rows), columns=["path", "note"]).assign(stage=stage)[NOTE_COLUMNS]
    with file_lock(csv_path):
        old = pd.read_csv(csv_path, dtype=str) if csv_path.is_file() else pd.DataFrame(columns=NOTE_COLUMNS)
        drop = (old["stage"] == stage) & (old["path"].isin(reread) if reread is not None else True)
        table = pd.concat([old[~drop], new], ignore_index=True).sort_values(["stage", "path"])
        write_csv(csv_path, table)
    return table


def summary_lines(rows: Iterable[tuple[str, str]], shown: int = 3, limit: int = 20) -> list[str]:
    """One line per distinct reason: ``<reason>: <path>`` or ``<reason>: <n> files (a, b, c, ...)``.

    A reason shared by a whole series (its padding, say) is one line instead of one per slice;
    past ``limit`` distinct reasons, one line counts the rest."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in rows:
        by_reason.setdefault(reason, []).append(str(path))
    lines = []
    for reason, paths in by_reason.items():
        if len(paths) == 1:
            lines.append(f"{paths[0]}: {reason}")
        else:
            more = ", ..." if len(paths) > shown else ""
            lines.append(f"{len(paths)} files ({', '.join(paths[:shown])}{more}): {reason}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more reasons"]
    return lines
