"""`make submit`: validate a file, refuse one already submitted, hand it to `kaggle competitions submit`,
log it, and wait for its public and private scores.

The kaggle client runs as a subprocess (competition.kaggle_cli); credentials are checked first so
that a missing token is one clear line, not a traceback from inside the client.
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from competition.constants import COMPETITION
from competition.kaggle_cli import check_credentials, kaggle_output
from competition.layout import Layout
from competition.paths import WorkPaths
from submissions.log import PENDING, append_row, git_commit, log_path_for, submitted_before
from submissions.provenance import facts_for, file_sha256
from submissions.scores import DEFAULT_POLL_S, DEFAULT_WAIT_S, listing_args, wait_for_scores
from submissions.validate import SubmissionError, validate_submission

REF_LINE = re.compile(r"Submission ref:\s*(\d+)")


def submit_args(file: Path | str, message: str) -> list[str]:
    """The kaggle client's arguments (after the `kaggle` executable)."""
    return ["competitions", "submit", "-c", COMPETITION, "-f", str(file), "-m", message]


def _check_inputs(file: Path, message: str) -> None:
    if not file.is_file():
        raise SubmissionError(f"submission {file} not found; write one with `make stack` or `make submission MODEL=...`")
    if not message.strip():
        raise SubmissionError("a submission needs a message: MESSAGE=\"what this is\"")


def submit(file: Path | str, message: str, data_dir: Path | str | None = None) -> str:
    """Submit ``file`` (validated first against ``data_dir``'s sample submission when given);
    returns the submission's ref as the client prints it ("" when it printed none)."""
    file = Path(file)
    _check_inputs(file, message)
    check_credentials()
    if data_dir is not None:
        layout = Layout.find(data_dir)
        layout.require("sample_submission")
        rows = validate_submission(file, layout.sample_submission)
        print(f"valid: {file} ({rows} rows)")
    found = REF_LINE.search(kaggle_output(submit_args(file, message), echo=True) or "")
    return found.group(1) if found else ""


def refuse_duplicate(log: Path, sha256: str, file: Path) -> None:
    earlier = submitted_before(log, sha256)
    if len(earlier):
        last = earlier.iloc[-1]
        scores = f", public {last['public_score']}" if last["public_score"] else ""
        raise SubmissionError(f"{file} was already submitted ({last['time']}, \"{last['message']}\"{scores}; "
                              f"same sha256 in {log}); FORCE=1 submits it again")


def submit_and_log(file: Path | str, message: str, data_dir: Path | str | None = None,
                   work_dir: Path | str | None = None, force: bool = False,
                   wait_s: float = DEFAULT_WAIT_S, poll_s: float = DEFAULT_POLL_S) -> dict[str, str]:
    """`make submit`: refuse a repeat (unless ``force``), submit, append the log row, wait for the scores."""
    file = Path(file)
    _check_inputs(file, message)
    sha, log = file_sha256(file), log_path_for(file)
    if not force:
        refuse_duplicate(log, sha, file)
    paths = WorkPaths.for_data(data_dir, work_dir) if data_dir is not None else None
    facts = facts_for(paths, sha)
    ref = submit(file, message, data_dir)
    row = {"time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "file": str(file),
           "sha256": sha, "message": message, **facts, "git_commit": git_commit(), "ref": ref, "status": PENDING}
    append_row(log, row)
    print(f"logged in {log}")
    scored = wait_for_scores(log, ref, wait_s, poll_s) if ref and wait_s > 0 else None
    print(score_line(row, scored, log))
    return {k: str(v) for k, v in (scored if scored is not None else row).items()}


def score_line(row: dict, scored, log: Path) -> str:
    oof = row.get("oof_weighted_log_loss")
    cv = f"OOF weighted log loss {float(oof):.5f} ({row['source']})" if oof not in (None, "") else "OOF score unknown"
    if scored is None:
        return (f"not scored yet ({cv}); look later with `make leaderboard LOG={log}` "
                f"or `kaggle {' '.join(listing_args())}`")
    if scored["status"] != "complete":
        return f"submission {scored['ref']}: Kaggle says {scored['status']} ({cv})"
    return f"public {scored['public_score']}  private {scored['private_score']}  |  {cv}"
