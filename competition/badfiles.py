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
