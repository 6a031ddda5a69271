"""Known failures -> one line naming the file, the cause and the fix.

Every command's entry point (``competition.cli.run_main``) passes what escapes it through
:func:`describe`; what it does not recognise is a bug and keeps its traceback. The operating
system's failures (full or read-only disk, permissions, too many open files), a corrupt
checkpoint, a dead worker process and a lock held by another run all end a run of days the same
way: one line, a non-zero exit, and finished work kept for the rerun.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import sysconfig
import zipfile
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType

PACKAGES = ("competition", "features", "level1_models", "level2_stacking", "prediction", "submissions")
RERUN = "run the same command again: finished work is kept"


class FixableError(Exception):
    """A failure the user can fix; the message is the whole story, in one line."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frames(tb: TracebackType | None) -> list:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]  # innermost first


def _path_like(value: object) -> str | None:
    if isinstance(value, (str, Path)) and str(value):
        return str(value)
    return None


def checkpoint_file(exc: BaseException) -> str | None:
    """The file ``torch.load`` was reading when ``exc`` was raised, or None."""
    for frame in _frames(exc.__traceback__):
        if frame.f_code.co_name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            return _path_like(frame.f_locals.get("f")) or "a checkpoint"
    return None


def _our_code(frame) -> bool:
    """A frame of this project (or of a script using it), not of the standard library or a package."""
    if str(frame.f_globals.get("__name__", "")).split(".")[0] in PACKAGES:
        return True
    library = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return not frame.f_code.co_filename.startswith(("<", *library))


def file_in_traceback(exc: BaseException) -> str | None:
    """Best guess at the file being written or read: an open file object, else a path-named local
    of the innermost frame of this project's code."""
    frames = _frames(exc.__traceback__)
    for frame in frames:
        for value in frame.f_locals.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
    for frame in frames:
        if _our_code(frame):
            for name in ("path", "target", "out_path", "csv_path", "dst", "tmp"):
                found = _path_like(frame.f_locals.get(name))
                if found:
                    return found
    return None


def damaged_file(exc: BaseException) -> str | None:
    """The table or JSON file that failed to parse (a half-written file, a disk fault), or None."""
    if not (type(exc).__module__.startswith("pyarrow") or isinstance(exc, json.JSONDecodeError)):
        return None
    quoted = re.search(r"'([^']+\.(?:parquet|json|csv))'", str(exc))
    if quoted:
        return quoted.group(1)
    found = file_in_traceback(exc)
    return found if found and Path(found).is_file() else None


def _errno_of(exc: OSError) -> int | None:
    if exc.errno is not None:
        return exc.errno
    match = re.search(r"\[Errno (\d+)\]", str(exc))  # pyarrow's IO errors carry it in the text only
    return int(match.group(1)) if match else None


def _free_near(path: str) -> str:
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return human_bytes(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown"


def _load_cause(exc: BaseException) -> str:
    """torch's weights-only refusal is a page of advice with the reason in the middle: keep the reason."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, EOFError):
        return "the file ends early: empty or truncated"
    if not lines or not lines[0].startswith("Weights only load failed"):
        return first_line(exc, 200).split(". ")[0][:100]
    reason = [line.replace("WeightsUnpickler error:", "").strip() for line in lines[1:]
              if not line.startswith(("Please file an issue", "Check the documentation"))]
    text = " ".join(r for r in reason if r) or "refused by the weights-only loader"
    return text if len(text) <= 100 else text[:97] + "..."


def describe_os_error(exc: OSError, fallback: str | None = None) -> str:
    code = _errno_of(exc)
    file = exc.filename or file_in_traceback(exc) or fallback or "the work folder"
    folder = str(Path(file).parent) if file != "the work folder" else file
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
        return (f"{what} writing {file} ({_free_near(file)} free there); free space on that disk or point "
                f"WORK= (--work) at a larger one, then {RERUN}")
    if code == errno.EROFS:
        return f"{file} is on a read-only file system; point WORK= (--work) at a writable folder or remount it read-write"
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied: {file}; make {folder} readable and writable for this user "
                f"or point WORK= (--work) at a folder you own")
    if code == errno.ENOENT:
        return f"{file}: no such file or directory; check DATA= and WORK=, or run the stage that writes it first"
    if code in (errno.EMFILE, errno.ENFILE):
        return f"too many open files (at {file}); raise the limit (`ulimit -n 65536`) or lower WORKERS, then {RERUN}"
    if code == errno.ENOMEM:
        return f"out of memory (at {file}); lower WORKERS or BATCH, then {RERUN}"
    if code == errno.EIO:
        return f"input/output error on {file}: the disk or network file system failed; check it (dmesg), then {RERUN}"
    name = errno.errorcode.get(code, "OSError") if code is not None else type(exc).__name__
    return f"{file}: {exc.strerror or first_line(exc)} ({name}); fix that, then {RERUN}"


def raised_with_own_message(exc: BaseException) -> bool:
    """An error type of this project raised with its own message (not wrapping an OS error code):
    that message names the cause and the ways out, and no generic line may replace it, even when
    the text quotes an OS error such as ``[Errno 111]`` from a failed download."""
    ours = type(exc).__module__.split(".")[0] in PACKAGES
    return ours and bool(str(exc)) and not (isinstance(exc, OSError) and exc.errno is not None)


def describe(exc: BaseException, expected: tuple[type[BaseException], ...] = (), fallback: str | None = None) -> str | None:
    """One line for a known failure (``expected``: the project's own error types), else None."""
    if isinstance(exc, FixableError):
        return str(exc)
    if raised_with_own_message(exc) and checkpoint_file(exc) is None:
        return first_line(exc, 1000)
    checkpoint = checkpoint_file(exc)
    if checkpoint is not None and isinstance(exc, (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile,
                                                   EOFError, ValueError, OSError)):
        if isinstance(exc, OSError) and exc.errno is not None:
            return describe_os_error(exc, checkpoint)
        return (f"{checkpoint} is not a readable checkpoint ({_load_cause(exc)}); delete it to train that "
                f"fold again, or restore a good copy")
    damaged = damaged_file(exc)
    if damaged is not None:
        return (f"{damaged} is damaged ({first_line(exc, 100)}); delete it and run the stage that writes it again "
                f"(the other finished files are kept)")
    if isinstance(exc, BrokenProcessPool):
        return ("a worker process died (killed by the system: most often for lack of memory, or a disk that "
                "filled up under a memory-mapped write: check `df`); run again with fewer workers "
                "(WORKERS=, --workers): finished work is kept")
    if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
        return (f"a DataLoader worker died ({first_line(exc, 100)}), most often for lack of memory or of "
                f"/dev/shm; lower BATCH or the loader workers (--workers, SET=workers=N), then {RERUN}")
    if isinstance(exc, MemoryError):
        return f"out of memory; lower BATCH or WORKERS, then {RERUN}"
    if isinstance(exc, OSError) and (exc.errno is not None or _errno_of(exc) is not None):
        return describe_os_error(exc, fallback)
    if expected and isinstance(exc, expected):
        if isinstance(exc, KeyError) and exc.args:
            return str(exc.args[0])
        return first_line(exc, 1000) if str(exc) else type(exc).__name__
    return None


def debug_requested() -> bool:
    return os.environ.get("RSNA_DEBUG", "") not in ("", "0")
