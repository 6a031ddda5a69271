"""The locks of one model's K-fold training, so that folds can run as independent jobs.

``oof-<model>-fold<k>`` (in ``<work>/.locks/``): held by the run training fold k, for as long as it
trains and predicts it. A run asked for a fold whose lock another live run holds skips that fold
(one line) and goes on with its next one: ``make oof MODEL=m`` on a second GPU helps a run that is
already going instead of failing. A run all of whose folds are held by others trains nothing and
stops with the lock's one-line "another run holds ..." message.

``oof-<model>-assemble``: a short lock, waited for, held only while a run writes the files the
model folder's folds share (``config.json`` at the start; ``metrics.json``, ``oof.parquet``,
``test.parquet``, ``curves.png`` and the finished stamp at the end), so two runs on different folds
never write them at once. Whichever run finishes the last fold assembles the whole model.

Under torchrun only rank 0 takes the locks (``stage_lock`` skips the others; the shared lock is
taken in rank 0's writing code only); rank 0's skip decisions reach the other ranks by all-reduce.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from competition.locks import LockHeldError, file_lock, stage_lock
from level1_models.folder import ModelFolder

__all__ = ["LockHeldError", "ModelLocks", "holder_line", "remove_fold_temporaries", "remove_shared_temporaries"]


@dataclass(frozen=True)
class ModelLocks:
    root: Path | None  # the work folder (None: no locks, for a model folder outside any work folder)
    model: str

    def fold(self, fold: int) -> contextlib.AbstractContextManager:
        """Hold fold ``fold``'s lock or raise :class:`LockHeldError` naming its holder."""
        if self.root is None:
            return contextlib.nullcontext()
        return stage_lock(self.root, f"oof-{self.model}-fold{fold}")

    def shared(self) -> contextlib.AbstractContextManager:
        """Wait for, then hold, the short lock on the model folder's shared files (rank 0 only)."""
        if self.root is None:
            return contextlib.nullcontext()
        return file_lock(Path(self.root) / f"oof-{self.model}-assemble")


def holder_line(fold: int, error: LockHeldError) -> str:
    """The one line a run says when it skips a fold another run trains."""
    holder = str(error).split("; wait for it")[0]
    return f"fold {fold}: skipped, {holder} (that run trains it)"


def remove_fold_temporaries(folder: ModelFolder, fold: int) -> None:
    """Leftovers of a killed run of ``fold`` (call holding the fold's lock)."""
    for tmp in [*folder.fold_dir(fold).glob(".*.tmp-*"), *folder.root.glob(f".{folder.curves_csv(fold).name}.tmp-*")]:
        tmp.unlink(missing_ok=True)


def remove_shared_temporaries(folder: ModelFolder) -> None:
    """Leftovers of a killed run's shared files (call holding the shared lock); a fold's are left to
    whoever trains it, which may be a live run."""
    for tmp in folder.root.glob(".*.tmp-*"):
        if not tmp.name.startswith(".curves_fold"):
            tmp.unlink(missing_ok=True)
