"""Load once, predict many: every fold model of every member on the device, then study after study.

A slice's level-1 probability is what the competition pipeline gives a test image: each fold
model's hflip-TTA probabilities (``level1_models.predict.predict_probabilities``) on the
``SliceDataset`` input (uint8, turned into floats on the device), averaged over folds
(``level1_models.train.assemble``); the members are then averaged (or stacked, see ``level2``).

Level 2 reads each series whole, as the pipeline did: a slice whose pixels do not decode keeps its
place with what level 1 gave an unreadable competition image (each fold model's training prior and
a zero embedding), so its neighbours get the stacked submission's rows; it gets no row itself.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from competition.constants import LABELS
from competition.paths import WorkPaths
from features.cache import brain_ratio
from features.dataset import SliceDataset
from features.tabular import BRAIN_COLUMN
from level1_models.config import TrainConfig, resolve
from features.windows import n_channels
from level1_models.predict import embedding_width, load_fold_model, predict_probabilities
from level2_stacking.fitted import load_fitted
from prediction.ensemble import Ensemble
from prediction.preprocess import MemoryCache
from prediction.study import Study

SLICE_COLUMNS = ["image_id", "study_id", "series_id", "slice_index", "z", *LABELS]


def fold_prior(done_json: Path) -> np.ndarray | None:
    """The training label rates a fold model gave the images it could not read (done.json), None
    for a fold trained before it recorded them."""
    rates = json.loads(done_json.read_text()).get("prior_rates") if done_json.is_file() else None
    return None if rates is None else np.asarray(rates, np.float64)


def with_stand_ins(values: np.ndarray, readable: np.ndarray, fill: np.ndarray | None) -> np.ndarray:
    """(folds, N, D) from the (folds, readable rows, D) ``values``: unreadable rows get ``fill``
    ((folds, D): one row per fold); ``values`` itself where every row is readable."""
    if readable.all():
        return values
    out = np.empty((values.shape[0], len(readable), values.shape[2]), values.dtype)
    out[:, readable] = values
    out[:, ~readable] = fill[:, None, :]
    return out


@dataclass
class StudyPrediction:
    study: Study
    slices: pd.DataFrame  # SLICE_COLUMNS, one row per readable slice, in series and z order
    per_fold: dict[str, np.ndarray]  # model -> folds x slices x 6
    embeddings: dict[str, np.ndarray]  # model -> folds x slices x D float16 (pooled features, as level 1 saves them)
    level: str  # "level 2 (stacked)" or "level-1 mean ..."
    seconds: float
    caches: dict = field(default_factory=dict, repr=False)  # (size, crop) -> MemoryCache, reused by the report


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """``Predictor(device).load(ensemble)`` then ``predict(study)`` for as many studies as wanted."""

    def __init__(self, device: str = "auto", batch_size: int = 64):
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.ensemble: Ensemble | None = None
        self.models: dict[str, list[tuple[int, torch.nn.Module]]] = {}
        self.configs: dict[str, TrainConfig] = {}
        self.stack = None  # the fitted level 2 (level2_stacking.fitted.FittedStack) when it applies
        self.priors: dict[str, np.ndarray | None] = {}  # member -> (folds, 6) rates for unreadable slices

    def load(self, ensemble: Ensemble) -> "Predictor":
        self.ensemble = ensemble
        cuda = self.device.type == "cuda"
        for member in ensemble.members:
            folder = ensemble.model_folder(member.name)
            loaded = [(k, load_fold_model(member.name, k, model_dir=folder.root, device=self.device))
                      for k in member.folds]
            self.models[member.name] = [(k, model) for k, (model, _) in loaded]
            priors = [fold_prior(folder.fold_done(k)) for k in member.folds]
            self.priors[member.name] = None if any(p is None for p in priors) else np.stack(priors)
            cfg = loaded[0][1][1]
            # The pipeline's automatic choices on this device (mixed precision on a GPU, none on CPU).
            self.configs[member.name] = resolve(dataclasses.replace(cfg, device=self.device.type, workers=0),
                                                cuda_available=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
        # Level 2 where the ensemble found it fit on exactly these members (prediction.level2).
        self.stack = load_fitted(WorkPaths(ensemble.root).stack) if ensemble.not_stacked is None else None
        if self.stack is None:
            print(f"note: level 2 not applied: {ensemble.not_stacked}; slices get the level-1 mean", file=sys.stderr)
        return self

    def fold_model(self, name: str, fold: int | None = None) -> tuple[torch.nn.Module, TrainConfig, int]:
        """One fold model of a member (its first fold by default), its resolved config and the fold."""
        folds = dict(self.models[name])
        k = next(iter(folds)) if fold is None else fold
        return folds[k], self.configs[name], k

    def dataset(self, study: Study, name: str, caches: dict | None = None) -> SliceDataset:
        """The member's input for the readable slices of ``study`` (``caches`` reused across members)."""
        member = next(m for m in self.ensemble.members if m.name == name)
        caches = {} if caches is None else caches
        key = (member.cache_size, member.crop)
        if key not in caches:
            caches[key] = MemoryCache(study.metadata, study.hu, member.cache_size, member.crop)
        cfg = self.configs[name]
        return SliceDataset(study.readable_ids, study.metadata, caches[key], cfg.combination, cfg.img_size, as_uint8=True)

    def _run(self, model: torch.nn.Module, ds: SliceDataset, index: np.ndarray, cfg: TrainConfig,
             pooled: np.ndarray) -> np.ndarray:
        """One fold model's probabilities; on a GPU out of memory the batch is halved (and kept so)."""
        while True:
            try:
                return predict_probabilities(model, ds, index, batch_size=self.batch_size, device=self.device,
                                             amp=cfg.amp, channels_last=cfg.channels_last, tta=cfg.tta,
                                             embeddings=pooled)
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                print(f"out of GPU memory: predicting {self.batch_size} slices at a time", file=sys.stderr, flush=True)

    def level2_inputs(self, study: Study, per_fold: dict[str, np.ndarray], embeddings: dict[str, np.ndarray]
                      ) -> tuple[dict, pd.DataFrame, dict, np.ndarray]:
        """What the fitted stack reads for ``study``: (per-fold probabilities, metadata, per-fold
        embeddings) of every placed slice, each series whole (module docstring), and which of those
        rows are the readable slices ``per_fold`` and ``embeddings`` hold."""
        meta = study.metadata.reset_index(drop=True)
        readable = meta["readable"].to_numpy(bool)
        lacking = [m for m in per_fold if self.priors.get(m) is None]
        if lacking and not readable.all():
            print(f"note: {lacking} recorded no prior for unreadable slices (trained before done.json had "
                  f"prior_rates); level 2 reads their series without those slices", file=sys.stderr)
            meta, readable = meta[readable].reset_index(drop=True), np.ones(int(readable.sum()), bool)
        if self.stack.feature_config.brain_ratio:  # as the cache computed it; NaN where it could not read
            meta[BRAIN_COLUMN] = np.array([brain_ratio(study.hu[i]) if ok else np.nan
                                           for i, ok in zip(meta["image_id"], readable)], np.float32)
        folds = {m.name: m.folds for m in self.ensemble.members}
        probs = {m: dict(zip(folds[m], with_stand_ins(p, readable, self.priors.get(m)))) for m, p in per_fold.items()}
        pooled = {m: dict(zip(folds[m], with_stand_ins(e, readable, np.zeros((len(e), e.shape[2]), e.dtype))))
                  for m, e in embeddings.items()}
        return probs, meta, pooled, readable

    def predict(self, study: Study) -> StudyPrediction:
        if self.ensemble is None:
            raise RuntimeError("Predictor.load(ensemble) first")
        t0 = time.perf_counter()
        caches: dict = {}
        per_fold, embeddings = {}, {}
        for member in self.ensemble.members:
            cfg = self.configs[member.name]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unreadable neighbours stand in as in the pipeline
                ds = self.dataset(study, member.name, caches)
            index = np.arange(len(ds))
            probs, pooled = [], []
            for _, model in self.models[member.name]:
                width = embedding_width(model, n_channels(cfg.combination), cfg.img_size, self.device)
                pooled.append(np.zeros((len(ds), width), np.float16))
                probs.append(self._run(model, ds, index, cfg, pooled[-1]))
            per_fold[member.name], embeddings[member.name] = np.stack(probs), np.stack(pooled)
        meta = study.metadata[study.metadata["readable"]].reset_index(drop=True)
        if self.stack is not None:
            inputs, meta_all, pooled, readable = self.level2_inputs(study, per_fold, embeddings)
            probs = self.stack.predict(inputs, meta_all, pooled)[readable]
            level = f"level 2 ({self.stack.stacker} stack of {', '.join(self.stack.models)})"
        else:
            probs = np.mean([p.mean(axis=0) for p in per_fold.values()], axis=0)
            level = f"level-1 mean over {len(per_fold)} model(s) and their folds (level 2 not applied)"
        slices = meta[["image_id", "study_id", "series_id", "slice_index", "z"]].copy()
        slices[list(LABELS)] = probs
        return StudyPrediction(study, slices, per_fold, embeddings, level, time.perf_counter() - t0, caches)
