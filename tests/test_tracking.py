"""Watching a level-1 run: ETAs, plain progress lines when stderr is a file, the experiment log."""
from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from level1_models.config import ConfigError
from level1_models.tracking import SafeTracker, Tracker, eta_text, etas, format_duration
from level1_models.train import run_oof
from test_train import CPU, make_inputs, small_config


def test_eta_is_epochs_left_times_the_measured_epoch_plus_the_folds_after():
    assert etas(None, epochs=5, epochs_done=2) is None  # nothing measured: nothing said
    assert eta_text(None) == ""
    assert etas(100.0, epochs=5, epochs_done=2, folds_after=2) == (300.0, 300.0 + 2 * 5 * 100.0)
    assert etas(100.0, epochs=5, epochs_done=2, epoch_share_done=0.25) == (275.0, 275.0)
    assert etas(100.0, epochs=5, epochs_done=5, folds_after=1) == (0.0, 500.0)
    assert format_duration(4320) == "1h12m"
    assert format_duration(65) == "1m05s" and format_duration(38.4) == "38s"
    assert format_duration(53 * 3600 + 20 * 60) == "53h20m"
    assert eta_text((4320, 20400)) == "fold ETA 1h12m, run ETA 5h40m"


def test_a_failing_tracker_warns_once_and_training_goes_on():
    class Full(Tracker):
        def scalar(self, name, value, step):
            raise OSError(28, "No space left on device")

    lines = []
    tracker = SafeTracker(Full, "tensorboard", lines.append)
    for step in range(3):
        tracker.scalar("train/loss", 0.5, step)
    tracker.close()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "training goes on" in lines[0]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    inputs = make_inputs(n_train=64)
    cfg = small_config(epochs=2, batch_size=8, folds=(0, 1), progress_seconds=1e-6)
    out = tmp_path_factory.mktemp("track") / "tiny_resnet"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    stdout, stderr = io.StringIO(), io.StringIO()  # StringIO.isatty() is False: a log file
    capture.setattr(sys, "stdout", stdout)
    capture.setattr(sys, "stderr", stderr)
    try:
        run_oof(cfg, inputs, out, CPU)
    finally:
        capture.undo()
    return out, stdout.getvalue(), stderr.getvalue()


def test_tensorboard_holds_the_curves_scalars(tracked_run):
    out = tracked_run[0]
    for fold in (0, 1):
        events = EventAccumulator(str(out / "tensorboard" / f"fold{fold}")).Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/val_weighted_log_loss", "epoch/lr",
                "epoch/images_per_s", "epoch/data_wait_share", "epoch/seconds", "epoch/train_seconds"} <= tags
        curve = pd.read_csv(out / f"curves_fold{fold}.csv")
        val = events.Scalars("epoch/val_weighted_log_loss")
        assert [e.step for e in val] == curve["epoch"].tolist()
        assert [e.value for e in val] == pytest.approx(curve["val_weighted_log_loss"].tolist(), rel=1e-6)
        steps = [e.step for e in events.Scalars("train/loss")]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2 * 2  # every optimiser step
        assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("epoch/data_wait_share"))


def test_a_log_file_gets_progress_lines_with_etas_once_an_epoch_was_measured(tracked_run):
    _, stdout, stderr = tracked_run
    assert "\r" not in stdout + stderr
    progress = [line for line in stdout.splitlines() if " images (" in line]
    first_epoch = [line for line in progress if "fold 0 epoch 1/2" in line]
    assert first_epoch and not any("ETA" in line for line in first_epoch)  # nothing measured yet: no guess
    assert all("img/s" in line and "loss" in line for line in progress)
    assert any("fold 0 epoch 2/2" in line and "fold ETA" in line and "run ETA" in line for line in progress)
    epoch_lines = [line for line in stdout.splitlines() if "val weighted log loss" in line]
    assert len(epoch_lines) == 4 and all("fold ETA" in line for line in epoch_lines)
    assert "fold ETA 0s" in epoch_lines[1]  # fold 0 ends; fold 1 is still ahead in the run's ETA


def test_tracker_none_writes_no_tensorboard_folder(tmp_path):
    run_oof(small_config(tracker="none", folds=(0,)), make_inputs(n_train=32), tmp_path / "m", CPU)
    assert (tmp_path / "m" / "oof.parquet").exists() or (tmp_path / "m" / "fold0" / "done.json").exists()
    assert not (tmp_path / "m" / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_not_installed_stops_the_run_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="pip install wandb") as err:
        run_oof(small_config(tracker="wandb"), make_inputs(n_train=32), tmp_path / "m", CPU)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m").exists()  # stopped before anything was written


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="tracker must be one of"):
        small_config(tracker="comet")


def test_a_terminal_keeps_the_bar_with_the_etas_and_gets_no_progress_lines(tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stdout, stderr = io.StringIO(), Terminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    cfg = small_config(epochs=2, batch_size=4, folds=(0,), tracker="none", progress_seconds=1e-6)
    run_oof(cfg, make_inputs(n_train=32), tmp_path / "m", CPU)
    monkeypatch.undo()
    frames = stderr.getvalue().split("\r")
    assert any("epoch 1/2" in f and "img_s=" in f for f in frames)
    assert any("epoch 2/2" in f and "fold ETA" in f for f in frames)
    assert " images (" not in stdout.getvalue()
