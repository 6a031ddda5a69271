"""python -m submissions write|validate|submit

  write    --data DATA [--work WORK] (--model NAME | --stack)   -> prints the written path
  validate FILE --data DATA                                      -> refuses a bad file, naming its first bad row
  submit   --file FILE --message MSG [--data DATA] [--force] [--wait S] [--poll S]
           -> validates (with --data), refuses a file already in the log, submits, logs it, waits for the scores
  leaderboard --log LOG                                          -> refreshes pending scores, prints the log
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from competition.cli import run_main
from competition.layout import Layout
from submissions.kaggle_submit import submit_and_log
from submissions.leaderboard import leaderboard
from submissions.scores import DEFAULT_POLL_S, DEFAULT_WAIT_S
from submissions.validate import SubmissionError, validate_submission
from submissions.write import DEFAULT_CLIP, DEFAULT_OUT_DIR, write_from_work


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m submissions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write", help="write the submission of the stacker or of one level-1 model")
    w.add_argument("--data", required=True, type=Path, help="competition folder (Kaggle layout)")
    w.add_argument("--work", type=Path, default=None, help="work folder (default work/<basename of DATA>)")
    source = w.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a level-1 model folder name")
    source.add_argument("--stack", action="store_true", help="the level-2 stacker's test predictions")
    w.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the file goes (default submissions/)")
    w.add_argument("--clip", type=float, default=DEFAULT_CLIP, help="probabilities clipped into [clip, 1-clip]")

    v = sub.add_parser("validate", help="check a file against the sample submission")
    v.add_argument("file", type=Path)
    v.add_argument("--data", required=True, type=Path)

    s = sub.add_parser("submit", help="kaggle competitions submit")
    s.add_argument("--file", required=True, type=Path)
    s.add_argument("--message", required=True)
    s.add_argument("--data", type=Path, default=None, help="validate against this folder's sample submission first")
    s.add_argument("--work", type=Path, default=None, help="work folder of DATA (default work/<basename of DATA>)")
    s.add_argument("--force", action="store_true", help="submit even if this very file was submitted before")
    s.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, help="seconds to wait for the score (0: do not wait)")
    s.add_argument("--poll", type=float, default=DEFAULT_POLL_S, help="seconds between two looks at the score")

    lb = sub.add_parser("leaderboard", help="refresh pending scores from Kaggle and print the submissions log")
    lb.add_argument("--log", required=True, type=Path)
    lb.add_argument("--no-refresh", action="store_true", help="print the log as it is, without asking Kaggle")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "write":
        path = write_from_work(args.data, args.work, None if args.stack else args.model, args.out_dir, args.clip)
        print(path)
    elif args.command == "validate":
        layout = Layout.find(args.data)
        layout.require("sample_submission")
        rows = validate_submission(args.file, layout.sample_submission)
        print(f"valid: {args.file} ({rows} rows)")
    elif args.command == "leaderboard":
        leaderboard(args.log, refresh=not args.no_refresh)
    else:
        if args.wait < 0 or args.poll <= 0:
            raise SubmissionError(f"WAIT must be >= 0 and the poll interval > 0 (got {args.wait:g}, {args.poll:g})")
        submit_and_log(args.file, args.message, args.data, args.work, args.force, args.wait, args.poll)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m submissions"))
