"""Refuse a submission file Kaggle would reject or score as garbage, naming the first bad row.

A file must hold exactly the sample submission's ids, once each, under the header ``ID,Label``,
every Label a number in [0, 1]. Lines are counted as in a text editor (the header is line 1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

HEADER = ["ID", "Label"]


class SubmissionError(ValueError):
    """The submission file is not acceptable; the message names the first bad row."""


def read_sample_ids(sample_submission: Path | str) -> pd.Index:
    path = Path(sample_submission)
    if not path.is_file():
        raise SubmissionError(f"sample submission {path} not found; is DATA the Kaggle competition folder?")
    ids = pd.Index(pd.read_csv(path, usecols=["ID"], dtype={"ID": str})["ID"])
    if ids.has_duplicates:
        raise SubmissionError(f"sample submission {path} repeats id {ids[ids.duplicated()][0]}")
    return ids


def validate_submission(path: Path | str, sample_submission: Path | str) -> int:
    """Return the number of rows of a valid file; raise SubmissionError naming the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"submission {path} not found")
    expected = read_sample_ids(sample_submission)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)  # strings: see exactly what is there
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise SubmissionError(f"submission {path} is not a readable CSV ({exc})") from exc
    if list(table.columns) != HEADER:
        raise SubmissionError(f"submission {path}: header is {','.join(map(str, table.columns))}, expected ID,Label")

    ids = table["ID"]
    raw = table["Label"].str.strip()
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    problems = [
        (~np.isfinite(values) & raw.str.lower().isin(["nan", ""]).to_numpy(), "Label is NaN or empty"),
        (np.isnan(values) & ~raw.str.lower().isin(["nan", ""]).to_numpy(), "Label is not a number"),
        (np.isinf(values) | (values < 0) | (values > 1), "Label is outside [0, 1]"),
        (ids.duplicated().to_numpy(), "ID appears twice"),
        (~ids.isin(expected).to_numpy(), "ID is not in the sample submission"),
    ]
    bad_rows = np.zeros(len(table), dtype=bool)
    for mask, _ in problems:
        bad_rows |= mask
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        why = "; ".join(reason for mask, reason in problems if mask[row])
        raise SubmissionError(
            f"submission {path}: line {row + 2} ({ids.iloc[row]}, Label {raw.iloc[row]!r}): {why} "
            f"[{int(bad_rows.sum())} bad row(s) in all]"
        )
    missing = expected.difference(pd.Index(ids), sort=False)
    if len(missing):
        raise SubmissionError(f"submission {path}: {len(missing)} id(s) of the sample submission missing, first {missing[0]}")
    return len(table)
