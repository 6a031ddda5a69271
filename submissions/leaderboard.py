"""`make leaderboard`: refresh the pending scores of the submissions log and print it as a table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from competition.kaggle_cli import KaggleCredentialsError, check_credentials
from submissions.log import PENDING, read_log
from submissions.scores import refresh_log

TABLE_COLUMNS = {"time": "time", "file": "file", "source": "source", "oof_weighted_log_loss": "OOF",
                 "public_score": "public", "private_score": "private", "status": "status", "message": "message"}


def log_table(log: pd.DataFrame) -> str:
    """The log as a fixed-width table (file names without folders, OOF to 5 digits)."""
    if not len(log):
        return "(no submissions logged yet)"
    table = log[list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS).copy()
    table["file"] = table["file"].map(lambda f: Path(f).name)
    table["OOF"] = pd.to_numeric(table["OOF"], errors="coerce").map(lambda v: "" if pd.isna(v) else f"{v:.5f}")
    return table.to_string(index=False)


def leaderboard(log_path: Path | str, refresh: bool = True) -> pd.DataFrame:
    """Refresh pending rows from Kaggle (when any and ``refresh``), print the table; returns the log."""
    log_path = Path(log_path)
    if not log_path.is_file():
        raise FileNotFoundError(f"no submissions log at {log_path}; `make submit FILE=...` writes it (or pass LOG=)")
    log = read_log(log_path)
    if refresh and (log["status"] == PENDING).any():
        try:
            check_credentials()
        except KaggleCredentialsError as exc:  # the table is still worth printing
            print(f"pending scores not refreshed: {exc}")
        else:
            log = refresh_log(log_path)
    print(log_table(log))
    return log
