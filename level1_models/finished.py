"""A finished model's ``make oof`` in about a second: skip importing torch and reassembling when
nothing the assembly reads has changed since it last ran.

After every fold is done, ``run_model`` writes a stamp (``.assembled.json`` in the model folder,
hidden so the HTML report does not count it as an input) with the content fingerprint of what the
assembly read: each fold's ``done.json``, ``oof.parquet``, ``test.parquet`` and curves, the
prepared tables (folds, labels, metadata), the sample submission (the test ids) and the image
cache's id lists (the readable images), and the fields that name the model. A rerun whose
fingerprint matches, and whose requested folds are all done, keeps every file as it is. This
module imports neither torch nor the training code.
"""
from __future__ import annotations

from pathlib import Path

from competition.layout import Layout, LayoutError
from competition.paths import WorkPaths
from competition.stamp import is_current, write_stamp
from level1_models.config import IDENTITY_FIELDS, TrainConfig
from level1_models.folder import ModelFolder

STAMP_FILE = ".assembled.json"


def _inputs(folder: ModelFolder, paths: WorkPaths, data_dir: Path | str) -> list[Path]:
    try:
        sample = [Layout.find(data_dir).sample_submission]
    except LayoutError:
        sample = []  # no dataset: the full run reports it
    per_fold = [p for name in ("done.json", "oof.parquet", "test.parquet") for p in folder.root.glob(f"fold*/{name}")]
    cache = [p for name in ("ids.txt", "status.uint8") for p in paths.cache.glob(f"*px/{name}")]
    return [paths.folds, paths.labels, paths.metadata, *sample, *per_fold,
            *folder.root.glob("curves_fold*.csv"), *cache]


def _options(cfg: TrainConfig) -> dict[str, object]:
    return {"name": cfg.name, **{k: getattr(cfg, k) for k in IDENTITY_FIELDS}}


def _outputs(folder: ModelFolder) -> list[Path]:
    return [folder.metrics, folder.oof, folder.test, folder.curves_png]


def is_assembled(cfg: TrainConfig, data_dir: Path | str, work_dir: Path | str | None) -> bool:
    """True when every requested fold is done and the model's files were assembled from exactly
    the fold outputs and tables there are now (so a run would only rewrite the same files)."""
    paths = WorkPaths.for_data(data_dir, work_dir)
    folder = ModelFolder(paths.model_dir(cfg.name))
    stamp = folder.root / STAMP_FILE
    if not stamp.is_file():
        return False
    if cfg.folds is not None and not all(folder.fold_done(k).is_file() for k in cfg.folds):
        return False
    return is_current(stamp, _outputs(folder), _inputs(folder, paths, data_dir), _options(cfg))


def mark_assembled(cfg: TrainConfig, data_dir: Path | str, work_dir: Path | str | None) -> None:
    """Called once ``oof.parquet`` and ``test.parquet`` were written from every fold."""
    paths = WorkPaths.for_data(data_dir, work_dir)
    folder = ModelFolder(paths.model_dir(cfg.name))
    write_stamp(folder.root / STAMP_FILE, _inputs(folder, paths, data_dir), _options(cfg))
