"""Shared command-line plumbing: expected failures become one line naming the fix, not a traceback."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from competition.badfiles import read_bad_files  # noqa: F401  (re-exported for CLIs)
from competition.dicom import DicomReadError
from competition.kaggle_cli import KaggleCredentialsError, KaggleError
from competition.labels import LabelError
from competition.layout import LayoutError
from competition.paths import WorkPaths

# Failures a user can fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    LayoutError,
    LabelError,
    DicomReadError,
    KaggleCredentialsError,
    KaggleError,
    FileNotFoundError,
    ValueError,
    KeyError,
)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="competition folder in the Kaggle layout")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default work/<basename of DATA>)")


def work_paths(args: argparse.Namespace) -> WorkPaths:
    return WorkPaths.for_data(args.data, args.work).ensure()


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, prog: str = "") -> int:
    """Call ``main``; an expected error prints ``error: <message>`` and exits 2 (RSNA_DEBUG=1 re-raises)."""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is kept, run the same command to resume", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if os.environ.get("RSNA_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prog + ': ' if prog else ''}error: {message}", file=sys.stderr)
        return 2
