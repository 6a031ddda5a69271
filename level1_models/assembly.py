"""The model folder's whole-model files: the check that a folder holds one model, and the
assembly of its finished folds into ``metrics.json``, ``curves.png`` and, once every fold is done,
``oof.parquet`` (every train image once) and ``test.parquet`` (the fold models' mean).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.metric import weighted_log_loss
from level1_models.atomic import write_json, write_parquet
from level1_models.config import IDENTITY_FIELDS, ConfigError, TrainConfig, read_config
from level1_models.curves import plot_curves
from level1_models.data import RunInputs
from level1_models.folder import ModelFolder
from level1_models.metrics import score


def check_same_model(folder: ModelFolder, cfg: TrainConfig) -> None:
    """A model folder holds one model: refuse to mix in a run whose architecture or input differs."""
    if not folder.config.is_file():
        return
    old = read_config(folder.config)
    diff = {k: (getattr(old, k), getattr(cfg, k)) for k in IDENTITY_FIELDS if getattr(old, k) != getattr(cfg, k)}
    if diff:
        text = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{folder.root} holds a run of {cfg.name} with other settings ({text}); "
                          f"delete that folder or pass another --work to train this variant")


def epoch_choice_pooled(done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The best and the last epoch's validation loss pooled over the finished folds (row-weighted:
    the metric is a mean over rows), and how much choosing the best epoch on its own fold flatters
    the OOF (``flattery`` = last - best, >= 0). Empty for folds run before these were recorded."""
    folds = [s for s in done.values() if "last_epoch_val_loss" in s]
    if not folds or len(folds) != len(done):
        return {}
    n = np.array([s["n_val_scored"] for s in folds], dtype=np.float64)
    best = float(np.dot(n, [s["best_epoch_val_loss"] for s in folds]) / n.sum())
    last = float(np.dot(n, [s["last_epoch_val_loss"] for s in folds]) / n.sum())
    return {"select": folds[0]["select"], "best_epoch_val_weighted_log_loss": best,
            "last_epoch_val_weighted_log_loss": last, "flattery": last - best,
            "note": "per-epoch validation pass (val_tta) over the fold's OOF rows; best = the epoch chosen on them"}


def assemble(cfg: TrainConfig, inputs: RunInputs, folder: ModelFolder) -> dict[str, Any]:
    """Metrics over the finished folds; ``oof.parquet`` / ``test.parquet`` once every fold is done."""
    all_folds = inputs.fold_numbers
    done = {k: json.loads(folder.fold_done(k).read_text()) for k in all_folds if folder.fold_done(k).is_file()}
    oofs, tests = [], []
    for k in done:
        oof = pd.read_parquet(folder.fold_oof(k))
        expected = inputs.folds.loc[inputs.folds["fold"] == k, "image_id"]
        if len(oof) != len(expected) or set(oof["image_id"]) != set(expected):
            raise ValueError(f"{folder.fold_oof(k)} does not hold exactly fold {k}'s images (the folds table "
                             f"changed?); delete {folder.fold_dir(k)} and rerun that fold")
        oofs.append(oof)
        test = pd.read_parquet(folder.fold_test(k))
        if test["image_id"].tolist() != inputs.test_ids:
            raise ValueError(f"{folder.fold_test(k)} does not hold the sample submission's images; "
                             f"delete {folder.fold_dir(k)} and rerun that fold")
        tests.append(test)
    complete = bool(done) and len(done) == len(all_folds)
    metrics: dict[str, Any] = {
        "model": cfg.name, "arch": cfg.arch, "combination": cfg.combination,
        "complete": complete, "n_folds": len(all_folds), "folds_done": sorted(done),
        "folds": {str(k): {**s["metrics"], "best_epoch": s["best_epoch"], "epochs_run": s["epochs_run"],
                           "prior_weighted_log_loss": s["prior_weighted_log_loss"]} for k, s in sorted(done.items())},
    }
    choice = epoch_choice_pooled(done)
    if choice:
        metrics["epoch_choice"] = choice
    if oofs:
        pooled = pd.concat(oofs, ignore_index=True).sort_values("image_id", ignore_index=True)
        # Scored on the readable images (unreadable ones carry the prior, not a prediction).
        scored = pooled if inputs.trainable is None else pooled[pooled["image_id"].isin(inputs.trainable)]
        y = inputs.label_array(scored["image_id"])
        metrics["pooled"] = score(y, scored[list(LABELS)].to_numpy())
        prior = np.array([done[int(f)]["prior_rates"] for f in scored["fold"]])
        metrics["prior_baseline"] = {"weighted_log_loss": weighted_log_loss(y, prior),
                                     "note": "each fold's training label rates, predicted for every image"}
    write_json(folder.metrics, metrics)
    curves = {k: pd.read_csv(folder.curves_csv(k)) for k in all_folds if folder.curves_csv(k).is_file()}
    if curves:
        plot_curves(curves, folder.curves_png, f"{cfg.name} ({cfg.arch}, {cfg.combination}, {cfg.img_size} px)")
    if complete:
        pooled = pooled[["image_id", "fold", *LABELS]]
        if pooled["image_id"].duplicated().any() or set(pooled["image_id"]) != set(inputs.folds["image_id"]):
            raise ValueError("the OOF predictions do not cover every train image exactly once")
        write_parquet(folder.oof, pooled)
        mean = np.mean([t[list(LABELS)].to_numpy() for t in tests], axis=0)
        test_frame = pd.DataFrame(mean, columns=list(LABELS))
        test_frame.insert(0, "image_id", inputs.test_ids)
        write_parquet(folder.test, test_frame)
    else:
        # Stale whole-model files (e.g. a fold folder was deleted to retrain it) must not linger.
        folder.oof.unlink(missing_ok=True)
        folder.test.unlink(missing_ok=True)
    return metrics
