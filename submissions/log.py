"""The submissions log: one row per file handed to Kaggle, its provenance and, once known, its scores.

Kept beside the submitted files (``<folder of FILE>/log.csv``, i.e. ``submissions/log.csv`` for the
files ``make stack`` writes), not in the work folder: the log is the record of spent daily
submissions and must outlive ``make clean-work``; a team can commit it. Every row carries the log's
format version (``log_version``) so a later format can read, or refuse, an older file by name.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd

LOG_NAME = "log.csv"
LOG_VERSION = 1
COLUMNS = ["log_version", "time", "file", "sha256", "message", "source", "models", "level2", "git_commit",
           "oof_weighted_log_loss", "ref", "status", "public_score", "private_score"]
SCORE_COLUMNS = ["status", "public_score", "private_score"]
PENDING = "pending"


class LogError(ValueError):
    """The log file is unreadable or of another format version."""


def log_path_for(file: Path | str) -> Path:
    return Path(file).resolve().parent / LOG_NAME


def read_log(path: Path | str) -> pd.DataFrame:
    """The log as strings (scores as written), empty with the log's columns when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS, dtype=str)
    try:
        log = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        raise LogError(f"submissions log {path} is not a readable CSV ({exc}); move it aside") from exc
    versions = set(log.get("log_version", pd.Series(["?"])))
    if versions - {str(LOG_VERSION)}:
        raise LogError(f"submissions log {path} has format version {sorted(versions)}, this code writes "
                       f"{LOG_VERSION}; move it aside or update the code")
    return log.reindex(columns=COLUMNS, fill_value="")


def write_log(path: Path | str, log: pd.DataFrame) -> None:
    """Atomic: an interrupted write leaves the previous log whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    log.reindex(columns=COLUMNS).assign(log_version=str(LOG_VERSION)).to_csv(tmp, index=False)
    tmp.replace(path)


def append_row(path: Path | str, row: dict[str, object]) -> pd.DataFrame:
    """Add one submission (missing fields empty); returns the new log."""
    log = read_log(path)
    new = {c: "" if row.get(c) is None else str(row.get(c, "")) for c in COLUMNS}
    new["log_version"] = str(LOG_VERSION)
    log = pd.concat([log, pd.DataFrame([new], columns=COLUMNS)], ignore_index=True)
    write_log(path, log)
    return log


def submitted_before(path: Path | str, sha256: str) -> pd.DataFrame:
    """The rows of earlier submissions of this very content."""
    log = read_log(path)
    return log[log["sha256"] == sha256]


def git_commit(where: Path | str = Path(__file__).parent) -> str:
    """The code's commit (with ``+dirty`` when files changed), or "" outside a git checkout."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = commit and git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git installed
        return ""
    return f"{commit}+dirty" if dirty else commit
