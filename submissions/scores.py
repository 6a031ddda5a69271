"""Scores from `kaggle competitions submissions --csv`, written into the submissions log.

The closed 2019 competition scores a late submission on both leaderboards at once, usually within
minutes; until then the client lists it as PENDING with empty scores.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from competition.constants import COMPETITION
from competition.kaggle_cli import kaggle_output
from submissions.log import PENDING, read_log, write_log

PAGE_SIZE = 200  # the client's maximum: one call covers every recent submission
DEFAULT_WAIT_S = 300.0
DEFAULT_POLL_S = 30.0


def listing_args(competition: str = COMPETITION) -> list[str]:
    return ["competitions", "submissions", "-c", competition, "--csv", "--page-size", str(PAGE_SIZE)]


def parse_listing(text: str) -> pd.DataFrame:
    """The client's CSV (ref, fileName, date, description, status, publicScore, privateScore) as strings;
    lines before its header (notices) are skipped; "No submissions found" is an empty table."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ref,")), None)
    if start is None:
        return pd.DataFrame(columns=["ref", "fileName", "description", "status", "publicScore", "privateScore"])
    table = pd.read_csv(io.StringIO("\n".join(lines[start:])), dtype=str, keep_default_na=False)
    # "SubmissionStatus.COMPLETE" -> "complete"
    table["status"] = table["status"].str.rsplit(".", n=1).str[-1].str.lower()
    return table


def fetch_listing(competition: str = COMPETITION) -> pd.DataFrame:
    return parse_listing(kaggle_output(listing_args(competition)))


def merge_scores(log: pd.DataFrame, listing: pd.DataFrame) -> pd.DataFrame:
    """Fill status and scores of the log's rows from the listing, matched by the submission's ref."""
    log = log.copy()
    by_ref = listing.set_index("ref") if len(listing) else listing
    for i, ref in log["ref"].items():
        if ref and ref in by_ref.index:
            found = by_ref.loc[ref]
            log.loc[i, ["status", "public_score", "private_score"]] = [
                found["status"], found["publicScore"], found["privateScore"]]
    return log


def refresh_log(path: Path | str, fetch: Callable[[], pd.DataFrame] = fetch_listing) -> pd.DataFrame:
    """Ask Kaggle once for the rows still pending; returns the (rewritten when changed) log."""
    log = read_log(path)
    if not (log["status"] == PENDING).any():
        return log
    updated = merge_scores(log, fetch())
    if not updated.equals(log):
        write_log(path, updated)
    return updated


def wait_for_scores(path: Path | str, ref: str, wait_s: float = DEFAULT_WAIT_S, poll_s: float = DEFAULT_POLL_S,
                    fetch: Callable[[], pd.DataFrame] = fetch_listing) -> pd.Series | None:
    """Poll until submission ``ref`` is no longer pending or ``wait_s`` has passed; its log row, or None."""
    deadline = time.monotonic() + wait_s
    while True:
        log = refresh_log(path, fetch)
        row = log[log["ref"] == ref]
        if len(row) and row.iloc[-1]["status"] != PENDING:
            return row.iloc[-1]
        if time.monotonic() + poll_s > deadline:
            return None
        print(f"submission {ref}: scoring; next look in {poll_s:g} s (WAIT={wait_s:g} s in all)", flush=True)
        time.sleep(poll_s)
