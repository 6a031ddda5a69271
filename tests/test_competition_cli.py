"""`python -m competition ...` end to end on small datasets: what it prints, and one-line errors."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd

from competition.__main__ import main
from competition.cli import run_main
from conftest import REPO
from dicom_factory import write_mini_competition


def run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """The real entry point, as a user types it."""
    return subprocess.run([sys.executable, "-m", "competition", *args], cwd=cwd, capture_output=True, text=True)


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same CLI in this process (no interpreter start-up): returncode, stdout, stderr."""
    code = run_main(main, list(args), prog="competition")
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_prepare_writes_metadata_labels_folds(tmp_path, capsys):
    data = write_mini_competition(tmp_path / "mini")
    work = tmp_path / "work"
    result = run_here(capsys, "prepare", "--data", str(data), "--work", str(work), "--workers", "1", "--n-folds", "3")
    assert result.returncode == 0, result.stderr
    for name in ("metadata.parquet", "labels.parquet", "folds.parquet"):
        assert f"wrote {work / name}" in result.stdout
    folds = pd.read_parquet(work / "folds.parquet")
    assert len(folds) == 18 and set(folds["fold"]) == {0, 1, 2}
    again = run_here(capsys, "folds", "--data", str(data), "--work", str(work))
    assert "kept" in again.stdout


def test_default_work_folder_is_named_after_data(tmp_path):
    data = write_mini_competition(tmp_path / "data" / "rsna_mini")
    (tmp_path / "here").mkdir()
    result = run("metadata", "--data", str(data), "--workers", "1", cwd=tmp_path / "here")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "here" / "work" / "rsna_mini" / "metadata.parquet").is_file()


def test_errors_are_one_line(tmp_path, capsys):
    result = run("metadata", "--data", str(tmp_path / "absent"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "does not exist" in result.stderr and "make data" in result.stderr
    (tmp_path / "stage_2_train").mkdir()
    result = run_here(capsys, "folds", "--data", str(tmp_path), "--work", str(tmp_path / "w"))
    assert result.returncode == 2 and "run `python -m competition metadata" in result.stderr
