"""What a prediction runs: the level-1 models with their fold checkpoints, how each one's images
were preprocessed (cache size, crop), and the study-level threshold chosen on the OOF predictions.

An ``Ensemble`` is read from a trained work folder (``from_work``) or from an unpacked bundle
(``prediction.bundle``); both hold the checkpoints as ``models/<name>/fold<k>/best.pt``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.paths import WorkPaths
from competition.study_level import DEFAULT_TARGET_SENSITIVITY, study_level_report, study_probability, study_truth
from features.cache import available_sizes, size_dir
from level1_models.config import TrainConfig, read_config
from level1_models.data import pick_cache_size
from level1_models.folder import ModelFolder
from prediction.level2 import why_not_stacked


class EnsembleError(ValueError):
    """The trained models cannot be used as asked; the message says which and what to run."""


@dataclass(frozen=True)
class Member:
    """One level-1 model: its name, trained folds, and the preprocessing its images had."""

    name: str
    folds: tuple[int, ...]
    combination: str
    img_size: int
    cache_size: int  # the image cache its training read (smallest built size >= img_size)
    crop: bool  # that cache cut each series to the head
    oof_weighted_log_loss: float | None = None  # its pooled OOF score (metrics.json), when every fold finished


@dataclass
class Ensemble:
    root: Path  # holds models/<name>/fold<k>/best.pt and config.json
    members: list[Member]
    threshold: dict = field(default_factory=dict)  # study-level decision threshold and its OOF figures
    source: str = ""  # the work folder or the bundle, for the report
    not_stacked: str | None = None  # None: level 2 applies to these members; else why not (prediction.level2)

    def model_folder(self, name: str) -> ModelFolder:
        return ModelFolder(WorkPaths(self.root).model_dir(name))

    def config(self, name: str) -> TrainConfig:
        return read_config(self.model_folder(name).config)

    def best_member(self) -> Member:
        """The member with the lowest OOF weighted log loss (the first one when none has a score)."""
        scored = [m for m in self.members if m.oof_weighted_log_loss is not None]
        return min(scored, key=lambda m: m.oof_weighted_log_loss) if scored else self.members[0]

    def to_json(self) -> dict:
        return {"members": [asdict(m) for m in self.members], "threshold": self.threshold,
                "level2": "stacked" if self.not_stacked is None else f"not applied: {self.not_stacked}"}


def finished_folds(folder: ModelFolder) -> tuple[int, ...]:
    """Folds with a best checkpoint that finished (done.json), in order."""
    found = []
    for best in folder.root.glob("fold*/best.pt"):
        k = best.parent.name[4:]
        if k.isdigit() and folder.fold_done(int(k)).is_file():
            found.append(int(k))
    return tuple(sorted(found))


def cache_used(cache_dir: Path, model_dir: Path, img_size: int) -> tuple[int, bool]:
    """The cache size a model's images came from (its config.json says so; runs before it recorded
    that: level1_models.data's rule over the caches built now) and whether that cache was cropped."""
    size = json.loads((model_dir / "config.json").read_text()).get("runtime", {}).get("cache_size")
    if size is None:
        try:
            size = pick_cache_size(available_sizes(cache_dir), img_size)
        except FileNotFoundError:
            raise EnsembleError(f"{model_dir} does not say which image cache it was trained from and {cache_dir} is "
                                f"gone; rebuild the cache it read (make cache CACHE_SIZE=<size>)") from None
    info_path = size_dir(cache_dir, size) / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"crop": "default"}  # the cache's default
    return int(size), info.get("crop") is not None


def pooled_oof_loss(folder: ModelFolder) -> float | None:
    if not folder.metrics.is_file():
        return None
    value = json.loads(folder.metrics.read_text()).get("pooled", {}).get("weighted_log_loss")
    return float(value) if value is not None else None


def trained_models(paths: WorkPaths) -> list[str]:
    if not paths.models.is_dir():
        return []
    return sorted(d.name for d in paths.models.iterdir() if d.is_dir() and finished_folds(ModelFolder(d)))


def from_work(paths: WorkPaths, models: Sequence[str] | None = None,
              target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> Ensemble:
    """The trained models of a work folder (``models`` or every one with a finished fold)."""
    present = trained_models(paths)
    names = [m.strip() for m in models if m.strip()] if models else present
    if not names:
        raise EnsembleError(f"no trained level-1 model under {paths.models} (fold<k>/best.pt + done.json); "
                            f"train one with `make oof MODEL=<name>`, or pass BUNDLE=<archive>")
    lacking = [m for m in names if m not in present]
    if lacking:
        raise EnsembleError(f"model(s) {lacking} have no finished fold under {paths.models}; trained: {present or 'none'}")
    members = []
    for name in names:
        folder = ModelFolder(paths.model_dir(name))
        cfg = read_config(folder.config)
        size, crop = cache_used(paths.cache, folder.root, cfg.img_size)
        members.append(Member(name, finished_folds(folder), cfg.combination, cfg.img_size, size, crop,
                              pooled_oof_loss(folder)))
    ensemble = Ensemble(paths.root, members, source=str(paths.root), not_stacked=why_not_stacked(paths.root, members))
    ensemble.threshold = oof_threshold(paths, names, target_sensitivity, stacked=ensemble.not_stacked is None)
    return ensemble


def level1_oof_mean(paths: WorkPaths, names: Sequence[str]) -> pd.DataFrame | None:
    """Mean over models of their OOF predictions (image_id + LABELS), None when one has none."""
    tables = []
    for name in names:
        oof = ModelFolder(paths.model_dir(name)).oof
        if not oof.is_file():
            return None
        tables.append(pd.read_parquet(oof).set_index("image_id")[list(LABELS)].sort_index())
    first = tables[0].index
    if any(not t.index.equals(first) for t in tables[1:]):
        raise EnsembleError(f"the OOF predictions of {list(names)} cover different images; retrain on one folds table")
    mean = pd.DataFrame(np.mean([t.to_numpy() for t in tables], axis=0), index=first, columns=list(LABELS))
    return mean.reset_index()


def stack_oof(paths: WorkPaths) -> pd.DataFrame | None:
    path = paths.stack / "oof.parquet"
    return pd.read_parquet(path).drop(columns="fold", errors="ignore") if path.is_file() else None


def oof_threshold(paths: WorkPaths, names: Sequence[str], target_sensitivity: float, stacked: bool = False) -> dict:
    """The recall-favouring study-level threshold on the OOF predictions of what predicts (the
    stack, or the level-1 mean of ``names``; study = max over slices of ``any``), with the
    sensitivity and specificity it gave there; empty when there is no OOF."""
    oof = stack_oof(paths) if stacked else level1_oof_mean(paths, names)
    if oof is None or not paths.metadata.is_file() or not paths.labels.is_file():
        return {}
    metadata = pd.read_parquet(paths.metadata, columns=["image_id", "study_id"])
    labels = pd.read_parquet(paths.labels)
    labels = labels[labels["image_id"].isin(oof["image_id"])]
    truth = study_truth(labels, metadata)
    if not truth.any():
        return {}
    score = study_probability(oof, metadata).reindex(truth.index)
    report = study_level_report(truth.to_numpy(), score.to_numpy(), target_sensitivity)
    figures = {k: float(v) if np.isfinite(v) else None for k, v in report.items()}  # NaN (no negatives): None in JSON
    return {**figures, "target_sensitivity": target_sensitivity,
            "pooling": "max over slices",
            "predictions": "level-2 stack OOF" if stacked else f"level-1 mean OOF of {', '.join(names)}"}
