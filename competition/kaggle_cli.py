"""The `kaggle` command-line client, called as a subprocess.

Never ``import kaggle`` here: the package authenticates at import time and raises without
credentials, which would break every command that does not need Kaggle at all.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from competition.progress import is_terminal

HOWTO = (
    "put your API token in ~/.kaggle/kaggle.json (chmod 600; Kaggle > Settings > Create New Token) "
    "or set KAGGLE_USERNAME and KAGGLE_KEY"
)


class KaggleCredentialsError(RuntimeError):
    """No usable Kaggle credentials."""


class KaggleError(RuntimeError):
    """The kaggle client ran and failed."""


def credential_files() -> list[Path]:
    """Where the kaggle client looks for kaggle.json, in its order."""
    files = []
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        files.append(Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json")
    files += [Path.home() / ".kaggle" / "kaggle.json", Path.home() / ".config" / "kaggle" / "kaggle.json"]
    return files


def check_credentials() -> None:
    """Raise KaggleCredentialsError with a one-line fix unless credentials are usable."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return
    for path in credential_files():
        if not path.is_file():
            continue
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KaggleCredentialsError(f"{path} is readable by others; run `chmod 600 {path}`")
        try:
            token = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise KaggleCredentialsError(f"{path} is not valid JSON ({exc}); download a new token: {HOWTO}") from exc
        if not (isinstance(token, dict) and token.get("username") and token.get("key")):
            raise KaggleCredentialsError(f"{path} lacks \"username\"/\"key\"; download a new token: {HOWTO}")
        return
    raise KaggleCredentialsError(f"no Kaggle credentials found: {HOWTO}")


def kaggle_executable() -> str:
    """The `kaggle` script of this environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).with_name("kaggle")
    if beside.is_file():
        return str(beside)
    found = shutil.which("kaggle")
    if not found:
        raise KaggleError("the `kaggle` command is not installed; run `make setup`")
    return found


def kaggle_command(args: list[str]) -> list[str]:
    """The command line; off a terminal, the client's tqdm bars redraw every 15 s, not 10 times a second."""
    if not is_terminal(sys.stderr):  # a log file would keep every carriage-return frame (tqdm reads TQDM_*)
        os.environ.setdefault("TQDM_MININTERVAL", "15")
    return [kaggle_executable(), *args]


def run_kaggle(args: list[str]) -> None:
    """Run the kaggle client after checking credentials; its output streams to the terminal."""
    check_credentials()
    cmd = kaggle_command(args)
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise KaggleError(f"`{' '.join(cmd)}` failed with exit code {result.returncode} (see its output above)")


def kaggle_output(args: list[str], echo: bool = False) -> str:
    """Run the kaggle client after checking credentials and return its stdout (``echo``: print it too).

    Its stderr streams to the terminal; a failure raises KaggleError with the client's last line."""
    check_credentials()
    cmd = kaggle_command(args)
    result = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True)
    if echo and result.stdout:
        print(result.stdout, end="" if result.stdout.endswith("\n") else "\n", flush=True)
    if result.returncode != 0:
        last = (result.stdout.strip().splitlines() or [""])[-1]
        raise KaggleError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}{': ' + last if last else ''}")
    return result.stdout
