"""Progress bars that suit where they are written: a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns many times a second; in a log file (``make demo > log``,
nohup, SLURM) every frame stays, thousands of them. Off a terminal, ``progress_bar`` writes one
ordinary line every ``LOG_INTERVAL_S`` seconds (and a last one when the bar closes) instead.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 15.0  # seconds between two progress lines in a log file


class _Lines:
    """A stream wrapper that drops tqdm's bare "\\r"/"\\n" cursor moves; real text passes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if text.strip("\r\n"):
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class LineBar(tqdm):
    """tqdm that prints each refresh as one plain line ending in a newline."""

    @staticmethod
    def status_printer(file):  # tqdm's hook for drawing one frame
        def print_line(text: str) -> None:
            if text.strip():
                file.write(text.strip() + "\n")
                file.flush()
        return print_line

    def display(self, msg=None, pos=None):
        if msg is None and self.n == getattr(self, "_shown_n", None):
            return True  # closing redraws the last count: one line per count is enough
        self._shown_n = self.n
        return super().display(msg, pos)


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: stderr, where bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def progress_bar(iterable=None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; off one, a LineBar writing a line every LOG_INTERVAL_S."""
    stream = kwargs.get("file") or sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, **kwargs)
    kwargs.update(file=_Lines(stream), mininterval=max(kwargs.get("mininterval", 0), LOG_INTERVAL_S),
                  dynamic_ncols=False, ncols=None, ascii=True)
    return LineBar(iterable, **kwargs)
