"""Shared command-line plumbing: expected failures become one line naming the fix, not a traceback."""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from competition.badfiles import read_bad_files  # noqa: F401  (re-exported for CLIs)
from competition.dicom import DicomReadError
from competition.failures import FixableError, debug_requested, describe
from competition.kaggle_cli import KaggleCredentialsError, KaggleError
from competition.labels import LabelError
from competition.layout import Layout, LayoutError
from competition.locks import stage_lock
from competition.paths import WorkPaths

# The project's own errors a user can fix (OS failures and the like: competition.failures);
# anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    LayoutError,
    LabelError,
    DicomReadError,
    KaggleCredentialsError,
    KaggleError,
    FixableError,
    FileNotFoundError,
    ValueError,
    KeyError,
)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="competition folder in the Kaggle layout")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default work/<basename of DATA>)")


def work_paths(args: argparse.Namespace) -> WorkPaths:
    """The work folder of ``--data``/``--work``, created only once DATA is known to be a competition."""
    Layout.find(args.data)
    return WorkPaths.for_data(args.data, args.work).ensure()


def work_lock(args: argparse.Namespace, stage: str) -> contextlib.AbstractContextManager:
    """``with work_lock(args, "stack"):`` one run at a time of ``stage`` in the work folder of
    ``--data``/``--work``. Without a work folder there is nothing to guard yet (the stage reports
    its missing inputs): no lock is taken and no folder is created."""
    root = WorkPaths.for_data(args.data, args.work).root
    return stage_lock(root, stage) if root.is_dir() else contextlib.nullcontext()


def _work_folder(argv: list[str]) -> str | None:
    """The work folder the command names (for a failure that names no file)."""
    for flag in ("--work", "--data"):
        if flag in argv[:-1]:
            value = argv[argv.index(flag) + 1]
            return value if flag == "--work" else str(WorkPaths.for_data(value).root)
    return None


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, prog: str = "") -> int:
    """Call ``main``; a known failure prints one line ``<prog>: error: <what, why, fix>`` and returns 2.

    Known: the project's own errors, OSError and kin, a corrupt checkpoint, a dead worker, a lock
    held by another run (see ``competition.failures``); anything else keeps its traceback.
    ``--debug`` anywhere on the command line (or RSNA_DEBUG=1) shows the traceback of known ones too.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_requested()
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is kept, run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        message = describe(exc, EXPECTED_ERRORS, fallback=_work_folder(argv))
        if message is None or debug:
            raise
        print(f"{prog + ': ' if prog else ''}error: {message}", file=sys.stderr)
        return 2
