"""`make submit`: hand a validated submission file to `kaggle competitions submit`.

The kaggle client runs as a subprocess (competition.kaggle_cli); credentials are checked first so
that a missing token is one clear line, not a traceback from inside the client.
"""
from __future__ import annotations

from pathlib import Path

from competition.constants import COMPETITION
from competition.kaggle_cli import check_credentials, run_kaggle
from competition.layout import Layout
from submissions.validate import SubmissionError, validate_submission


def submit_args(file: Path | str, message: str) -> list[str]:
    """The kaggle client's arguments (after the `kaggle` executable)."""
    return ["competitions", "submit", "-c", COMPETITION, "-f", str(file), "-m", message]


def submit(file: Path | str, message: str, data_dir: Path | str | None = None) -> None:
    """Submit ``file``; with ``data_dir``, validate it against that folder's sample submission first."""
    file = Path(file)
    if not file.is_file():
        raise SubmissionError(f"submission {file} not found; write one with `make stack` or `make submission MODEL=...`")
    if not message.strip():
        raise SubmissionError("a submission needs a message: MESSAGE=\"what this is\"")
    check_credentials()
    if data_dir is not None:
        layout = Layout.find(data_dir)
        layout.require("sample_submission")
        rows = validate_submission(file, layout.sample_submission)
        print(f"valid: {file} ({rows} rows)")
    run_kaggle(submit_args(file, message))
