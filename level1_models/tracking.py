"""Watching a level-1 run: ETAs, plain progress lines in a log file, and an experiment log.

- ETA: the fold's (epochs left x the last measured epoch, validation included) and the run's (plus
  the folds of this run not started yet, each ``epochs`` such epochs; early stopping can only make
  them shorter, the final OOF/test prediction is not counted). Nothing is said before an epoch of
  this process has been measured.
- Progress lines: when stderr is not a terminal (a log file, nohup, SLURM) the tqdm bar is not drawn;
  instead one plain line every ``progress_seconds`` (0: none).
- Trackers (``tracker``): TensorBoard by default, into ``<model folder>/tensorboard/fold<k>/``;
  wandb or mlflow when chosen (imported only then); ``none``. Only rank 0 writes. A failing write
  (a full disk) becomes one warning line and turns the tracker off: it never stops training.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


# --- ETA ------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``1h12m``, ``4m05s``, ``38s`` (days as hours: ``53h20m``)."""
    s = max(0, int(round(seconds)))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def etas(epoch_seconds: float | None, epochs: int, epochs_done: int, epoch_share_done: float = 0.0,
         folds_after: int = 0) -> tuple[float, float] | None:
    """(fold ETA, run ETA) in seconds, or None before an epoch was measured.

    ``epochs_done`` epochs of the fold are finished and ``epoch_share_done`` of the next one; the
    fold needs the rest of ``epochs``, each ``epoch_seconds``; the run needs that plus ``folds_after``
    whole folds."""
    if epoch_seconds is None:
        return None
    left = max(0.0, epochs - epochs_done - min(max(epoch_share_done, 0.0), 1.0))
    fold = left * epoch_seconds
    return fold, fold + folds_after * epochs * epoch_seconds


def eta_text(estimate: tuple[float, float] | None) -> str:
    if estimate is None:
        return ""
    return f"fold ETA {format_duration(estimate[0])}, run ETA {format_duration(estimate[1])}"


# --- trackers -------------------------------------------------------------------------------------


class Tracker:
    """The experiment log of one fold: ``scalar(name, value, step)`` and ``close()``."""

    def scalar(self, name: str, value: float, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """project = the model's name, run = the fold; each scalar family (``train/``, ``epoch/``) has
    its own step axis (wandb's own step must only grow)."""

    def __init__(self, project: str, run: str, directory: Path, config: dict):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run, dir=str(directory), config=config, reinit=True)
        self.axes: set[str] = set()

    def scalar(self, name: str, value: float, step: int) -> None:
        axis = name.split("/")[0] + "_step"
        if axis not in self.axes:
            self.run.define_metric(f"{name.split('/')[0]}/*", step_metric=axis)
            self.axes.add(axis)
        self.run.log({name: value, axis: step})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """experiment = the model's name, run = the fold (MLFLOW_TRACKING_URI says where)."""

    def __init__(self, experiment: str, run: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def scalar(self, name: str, value: float, step: int) -> None:
        self.mlflow.log_metric(name, value, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class SafeTracker(Tracker):
    """Writes that cannot fail the run: the first error is one warning line, then nothing is written."""

    def __init__(self, make: Callable[[], Tracker], name: str, log: Callable[[str], None]):
        self.name, self.log = name, log
        self.inner: Tracker | None = None
        self._guard(lambda: setattr(self, "inner", make()), "open")

    def _guard(self, action: Callable[[], object], what: str) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 -- a tracker (disk, network) must never stop training
            self.inner = None
            self.log(f"warning: {self.name} tracker failed to {what} ({type(err).__name__}: {err}); "
                     f"tracking is off for the rest of this fold, training goes on")

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.inner is not None:
            inner = self.inner
            self._guard(lambda: inner.scalar(name, float(value), int(step)), "write")

    def close(self) -> None:
        if self.inner is not None:
            inner = self.inner
            self._guard(inner.close, "close")
            self.inner = None


def check_tracker(name: str) -> None:
    """At the start of a run: an unknown tracker or one that is not installed stops it, in one line."""
    from level1_models.config import ConfigError

    if name not in TRACKERS:
        raise ConfigError(f"tracker must be one of {', '.join(TRACKERS)}, got {name!r}")
    package = _PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(f"tracker={name} needs {package}, which is not installed: pip install {package} "
                          f'(or SET="tracker=none")')


def open_tracker(name: str, model_dir: Path, model: str, fold: int, config: dict,
                 log: Callable[[str], None]) -> Tracker:
    if name == "none":
        return Tracker()
    makers: dict[str, Callable[[], Tracker]] = {
        "tensorboard": lambda: TensorBoardTracker(model_dir / "tensorboard" / f"fold{fold}"),
        "wandb": lambda: WandbTracker(model, f"fold{fold}", model_dir / "wandb", config),
        "mlflow": lambda: MlflowTracker(model, f"fold{fold}", config),
    }
    return SafeTracker(makers[name], name, log)


# --- the watch of a run and of a fold -------------------------------------------------------------


class RunWatch:
    """Made once per ``run_oof``: checks the tracker, knows the folds of this run still to train and
    the last measured epoch (folds of one run share a model, so one epoch measures them all)."""

    def __init__(self, name: str, tracker: str, epochs: int, pending: Sequence[int], progress_seconds: float,
                 model_dir: Path, config: dict, log: Callable[[str], None], is_main: bool):
        check_tracker(tracker)
        self.name, self.tracker, self.epochs, self.pending = name, tracker, epochs, list(pending)
        self.every, self.model_dir, self.config, self.log, self.is_main = (progress_seconds, model_dir, config, log,
                                                                          is_main)
        self.epoch_seconds: float | None = None
        self.current: FoldWatch | None = None

    @classmethod
    def for_run(cls, cfg, rt, model_dir: Path, pending: Sequence[int]) -> "RunWatch":
        """From a TrainConfig and a loop.Runtime; ``pending``: the folds of this run not finished yet."""
        return cls(cfg.name, cfg.tracker, cfg.epochs, pending, cfg.progress_seconds, model_dir, cfg.to_dict(), rt.log,
                   rt.env.is_main)

    def start_fold(self, fold: int, epochs_done: int) -> "FoldWatch":
        self.close()
        after = self.pending[self.pending.index(fold) + 1:] if fold in self.pending else []
        tracker = (open_tracker(self.tracker, self.model_dir, self.name, fold, self.config, self.log)
                   if self.is_main else Tracker())
        self.current = FoldWatch(self, fold, epochs_done, len(after), tracker)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.tracker.close()
            self.current = None


class FoldWatch:
    """One fold: the ETAs, the progress lines of an epoch, and the tracker's scalars."""

    def __init__(self, run: RunWatch, fold: int, epochs_done: int, folds_after: int, tracker: Tracker):
        self.run, self.fold, self.epochs_done, self.folds_after, self.tracker = run, fold, epochs_done, folds_after, tracker
        self.epoch_start = time.perf_counter()
        self.whole_epoch = True
        self.seconds = 0.0
        self.last_line = time.monotonic()

    # the epoch loop (loop.train_one_epoch)
    @staticmethod
    def draw_bar() -> bool:
        return sys.stderr.isatty()

    def epoch_begins(self, resumed_inside: bool) -> None:
        self.epoch_start = time.perf_counter()
        self.whole_epoch = not resumed_inside  # a resumed epoch's duration measures only its rest
        self.last_line = time.monotonic()

    def estimate(self, share_done: float = 0.0) -> tuple[float, float] | None:
        return etas(self.run.epoch_seconds, self.run.epochs, self.epochs_done, share_done, self.folds_after)

    def step(self, optimizer_step: int, step_loss: float, lr: float, images_done: int, n_images: int,
             images_per_s: float, mean_loss: float, desc: str) -> str:
        """After an optimiser step: its scalars; a progress line when one is due; the bar's ETA text."""
        self.tracker.scalar("train/loss", step_loss, optimizer_step)
        self.tracker.scalar("train/lr", lr, optimizer_step)
        text = eta_text(self.estimate(images_done / max(n_images, 1)))
        now = time.monotonic()
        if not self.draw_bar() and self.run.every > 0 and now - self.last_line >= self.run.every:
            self.last_line = now
            line = (f"{desc}: {images_done}/{n_images} images ({100.0 * images_done / max(n_images, 1):.0f}%)  "
                    f"{images_per_s:.1f} img/s  loss {mean_loss:.4f}")
            self.run.log(line + (f"  {text}" if text else ""))
        return text

    # the fold loop (train.train_fold)
    def epoch_done(self, number: int) -> str:
        """After an epoch's validation: measure it (a whole one) and return the log line's ETA text."""
        self.seconds = time.perf_counter() - self.epoch_start
        if self.whole_epoch:
            self.run.epoch_seconds = self.seconds
        self.epochs_done = number
        text = eta_text(self.estimate())
        return f"  {text}" if text else ""

    def epoch_scalars(self, row: dict, data_wait_share: float | None) -> None:
        """After the epoch's curve row: its scalars by epoch number (``epoch/seconds`` with validation)."""
        number = int(row["epoch"])
        for name, key in (("train_loss", "train_loss"), ("val_weighted_log_loss", "val_weighted_log_loss"),
                          ("lr", "lr"), ("images_per_s", "train_images_per_s"), ("train_seconds", "epoch_seconds")):
            self.tracker.scalar(f"epoch/{name}", row[key], number)
        self.tracker.scalar("epoch/seconds", self.seconds, number)
        if data_wait_share is not None:
            self.tracker.scalar("epoch/data_wait_share", data_wait_share, number)

