"""`make data`: download the competition with the kaggle client and unzip it safely into DATA."""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from competition.progress import progress_bar

from competition.constants import COMPETITION
from competition.diskspace import check_free_space
from competition.kaggle_cli import KaggleError, run_kaggle


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder."""


def download_args(data_dir: Path | str, competition: str = COMPETITION) -> list[str]:
    return ["competitions", "download", "-c", competition, "-p", str(data_dir)]


def is_complete_zip(path: Path) -> bool:
    """A zip whose central directory reads: an interrupted download fails this."""
    try:
        with zipfile.ZipFile(path) as archive:
            return len(archive.infolist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def safe_target(root: Path, member: str) -> Path:
    """Where ``member`` extracts to, refusing absolute paths and ``..`` escapes."""
    target = (root / member).resolve()
    if not target.is_relative_to(root.resolve()):
        raise UnsafeArchiveError(f"archive member {member!r} would extract outside {root}; refusing the archive")
    return target


def safe_unzip(archive_path: Path | str, target_dir: Path | str, progress: bool = True) -> int:
    """Extract every member under ``target_dir``; returns the number of files written.

    Checked before anything is written: no member may escape the target. Each file is written
    to a temporary name and renamed when complete, and files already present with the right size
    are skipped, so an interrupted unzip resumes and never leaves a half file under its real name.
    """
    root = Path(target_dir)
    root.mkdir(parents=True, exist_ok=True)
    written = 0
    with zipfile.ZipFile(archive_path) as archive:
        members = archive.infolist()
        targets = [safe_target(root, m.filename) for m in members]
        to_write = [m.file_size for m, t in zip(members, targets) if not (t.is_file() and t.stat().st_size == m.file_size)]
        check_free_space(root, sum(to_write), f"unzipping {Path(archive_path).name}", elsewhere="DATA=")
        for member, target in progress_bar(list(zip(members, targets)), desc=f"unzip {Path(archive_path).name}", unit="file", disable=not progress):
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if target.is_file() and target.stat().st_size == member.file_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")  # unique: two unzips never share one
            try:
                with archive.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
            written += 1
    return written


def download_competition(data_dir: Path | str, competition: str = COMPETITION, keep_zip: bool = True) -> Path:
    """Download (or finish downloading) and unzip the competition into ``data_dir``."""
    data_dir = Path(data_dir)
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _download_into(data_dir, competition, keep_zip)
    except BaseException:
        if created and not any(data_dir.iterdir()):
            data_dir.rmdir()  # a failed first try (no credentials, no network) leaves no empty DATA behind
        raise


def _download_into(data_dir: Path, competition: str, keep_zip: bool) -> Path:
    archive = data_dir / f"{competition}.zip"
    marker = data_dir / f".{archive.name}.unzipped"
    if marker.is_file():
        return data_dir
    if archive.exists() and not is_complete_zip(archive):
        print(f"{archive} is incomplete (interrupted download); downloading it again")
        archive.unlink()
    if not archive.exists():
        run_kaggle(download_args(data_dir, competition))
        if not is_complete_zip(archive):
            raise KaggleError(f"the kaggle client finished but {archive} is not a complete zip; run `make data` again")
    safe_unzip(archive, data_dir)
    marker.touch()
    if not keep_zip:
        archive.unlink()
    return data_dir
