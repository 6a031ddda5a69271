"""Folds as independent jobs: a lock per model and fold, the shared files under a short lock, and
``oof --spread folds --gpus N`` (one process per device, here N CPU processes)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from competition.cli import run_main
from competition.constants import LABELS
from competition.locks import LockHeldError
from conftest import REPO, prepare_tiny_competition
from level1_models.__main__ import main
from level1_models.folder import ModelFolder
from test_faults import held_elsewhere, one_line_error

MODEL = "tiny_resnet"
OPTIONS = ["--model", MODEL, "--img-size", "32", "--epochs", "1", "--workers", "0", "--device", "cpu",
           "--set", "augment=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    data, paths = prepare_tiny_competition(tmp_path_factory.mktemp("folds"))
    return data, paths.root


def fresh_work(prepared: tuple[Path, Path], dest: Path) -> Path:
    """A copy of the prepared work folder without any model."""
    shutil.copytree(prepared[1], dest, ignore=shutil.ignore_patterns("models", ".locks", "logs"))
    return dest


def oof_command(data: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "level1_models", "oof", "--data", str(data), "--work", str(work), *OPTIONS, *extra]


def outputs(work: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = ModelFolder(work / "models" / MODEL)
    return pd.read_parquet(folder.oof), pd.read_parquet(folder.test)


def assert_same_outputs(a: tuple[pd.DataFrame, pd.DataFrame], b: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    for x, y in zip(a, b):
        assert x["image_id"].tolist() == y["image_id"].tolist()
        np.testing.assert_allclose(x[list(LABELS)].to_numpy(), y[list(LABELS)].to_numpy(), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def sequential(prepared, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plain run: both folds, one after the other, in one process."""
    work = fresh_work(prepared, tmp_path_factory.mktemp("sequential") / "work")
    run = subprocess.run(oof_command(prepared[0], work), cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return outputs(work)


def test_a_run_on_a_fold_another_run_holds_is_refused_in_one_line(prepared, tmp_path, capsys):
    data, work = prepared[0], fresh_work(prepared, tmp_path / "work")
    with held_elsewhere(work, f"oof-{MODEL}-fold0") as holder:
        code = run_main(main, ["oof", "--data", str(data), "--work", str(work), *OPTIONS, "--folds", "0"],
                        prog="level1_models")
        line = one_line_error(capsys.readouterr().err)
        assert code == 2 and f"another run holds {work / '.locks' / f'oof-{MODEL}-fold0'}.lock" in line
        assert f"pid {holder.pid} " in line
        # The same decision inside the run (what a run whose folds were all taken meanwhile meets).
        from level1_models.train import run_model

        with pytest.raises(LockHeldError, match=f"pid {holder.pid} "):
            run_model(MODEL, data, work, {"folds": (0,), "img_size": 32, "epochs": 1, "workers": 0,
                                          "device": "cpu", "augment": False})
    assert not (work / "models" / MODEL / "fold0" / "done.json").exists()


def test_a_held_fold_is_skipped_and_the_next_one_trained(prepared, tmp_path, capsys):
    data, work = prepared[0], fresh_work(prepared, tmp_path / "work")
    folder = ModelFolder(work / "models" / MODEL)
    with held_elsewhere(work, f"oof-{MODEL}-fold0") as holder:
        assert main(["oof", "--data", str(data), "--work", str(work), *OPTIONS, "--folds", "0,1"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("fold 0: skipped")]
    assert len(skipped) == 1 and f"pid {holder.pid} " in skipped[0], out
    assert folder.fold_done(1).is_file() and not folder.fold_done(0).exists()
    assert folder.config.is_file() and folder.metrics.is_file() and not folder.oof.exists()  # assembled later


@pytest.mark.slow
def test_two_runs_on_different_folds_at_once_equal_the_sequential_run(prepared, sequential, tmp_path, capsys):
    data, work = prepared[0], fresh_work(prepared, tmp_path / "work")
    jobs = [subprocess.Popen(oof_command(data, work, "--folds", str(k)), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    results = [(job.communicate(timeout=600), job.returncode) for job in jobs]
    for (stdout, stderr), code in results:
        assert code == 0, stderr[-3000:]
        assert "skipped" not in stdout
    # Whichever finished last assembled the model.
    assert sum("over 2 folds" in stdout for (stdout, _), _ in results) >= 1
    assert_same_outputs(outputs(work), sequential)
    # The fast path: the finished stamp was written by that run; nothing to redo.
    assert main(["oof", "--data", str(data), "--work", str(work), *OPTIONS]) == 0
    assert "are up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_spread_folds_runs_one_process_per_device_and_equals_the_sequential_run(prepared, sequential, tmp_path):
    data, work = prepared[0], fresh_work(prepared, tmp_path / "work")
    run = subprocess.run(oof_command(data, work, "--spread", "folds", "--gpus", "2"), cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "fold 0: started on device 0" in run.stdout and "fold 1: started on device 1" in run.stdout
    assert_same_outputs(outputs(work), sequential)
    for k in (0, 1):
        log = (work / "logs" / f"oof-{MODEL}-fold{k}.log").read_text()
        assert f"fold {k}: best epoch" in log


def test_spread_names_the_fold_that_failed_and_its_log(prepared, tmp_path, capsys):
    data, work = prepared[0], fresh_work(prepared, tmp_path / "work")
    with held_elsewhere(work, f"oof-{MODEL}-fold1"):
        code = run_main(main, ["oof", "--data", str(data), "--work", str(work), *OPTIONS, "--folds", "1",
                               "--spread", "folds", "--gpus", "2"], prog="level1_models")
    line = one_line_error(capsys.readouterr().err)
    log = work / "logs" / f"oof-{MODEL}-fold1.log"
    assert code == 2 and line.startswith("level1_models: error: fold 1 failed (exit 2): ") and str(log) in line
    assert "another run holds" in line
