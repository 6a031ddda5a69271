"""Patient-level diagnosis: does this study show a hemorrhage at all?

The slice model's ``any`` probabilities are pooled per study (max by default: one bleeding slice
makes a bleeding study), and the study-level operating point is chosen to favour recall (a missed
bleed costs more than a second look): the highest threshold whose sensitivity reaches the target.
The threshold is chosen on the same studies it is reported on, as the reference paper does; pass
``threshold=`` to score a threshold chosen elsewhere (e.g. on OOF, applied to test).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

POOLING = ("max", "top3_mean", "noisy_or")
DEFAULT_TARGET_SENSITIVITY = 0.95


def _study_of(image_ids: pd.Series, metadata: pd.DataFrame, group_col: str) -> np.ndarray:
    meta = metadata.drop_duplicates("image_id").set_index("image_id")[group_col]
    study = meta.reindex(pd.Index(image_ids)).to_numpy()
    if pd.isna(study).any():
        missing = pd.Index(image_ids)[pd.isna(study)]
        raise ValueError(f"{len(missing)} image(s) have no {group_col} in the metadata, e.g. {missing[0]}; was it built from this DATA?")
    return study


def study_probability(slices: pd.DataFrame, metadata: pd.DataFrame, pooling: str = "max",
                      column: str = "any", group_col: str = "study_id") -> pd.Series:
    """Per-study probability of hemorrhage from slice probabilities (``image_id`` + ``column``).

    ``max``: the most suspicious slice; ``top3_mean``: mean of the three most suspicious (less
    swayed by one noisy slice); ``noisy_or``: 1 - prod(1 - p), every slice an independent witness.
    """
    if pooling not in POOLING:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLING)}")
    p = pd.Series(slices[column].to_numpy(dtype=np.float64), index=_study_of(slices["image_id"], metadata, group_col))
    groups = p.groupby(level=0, sort=True)
    if pooling == "max":
        out = groups.max()
    elif pooling == "top3_mean":
        out = groups.apply(lambda v: float(np.sort(v.to_numpy())[-3:].mean()))
    else:
        out = 1.0 - np.exp(np.log1p(-p.clip(upper=1 - 1e-12)).groupby(level=0, sort=True).sum())
    out.index.name = group_col
    return out.rename("probability")


def study_truth(labels: pd.DataFrame, metadata: pd.DataFrame, column: str = "any", group_col: str = "study_id") -> pd.Series:
    """1 for a study with at least one positive slice, else 0."""
    y = pd.Series(labels[column].to_numpy(dtype=np.int64), index=_study_of(labels["image_id"], metadata, group_col))
    out = y.groupby(level=0, sort=True).max()
    out.index.name = group_col
    return out.rename("truth")


def threshold_for_sensitivity(y_true: np.ndarray, score: np.ndarray, target: float = DEFAULT_TARGET_SENSITIVITY) -> float:
    """The highest threshold t with sensitivity(score >= t) >= target."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y_true = np.asarray(y_true).astype(bool)
    positives = np.sort(np.asarray(score, dtype=np.float64)[y_true])[::-1]
    if not len(positives):
        raise ValueError("no positive study: sensitivity is undefined")
    needed = math.ceil(target * len(positives) - 1e-9)
    return float(positives[needed - 1])


def study_level_report(y_true: np.ndarray, score: np.ndarray, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                       threshold: float | None = None) -> dict[str, float]:
    """Study-level accuracy, ROC AUC, sensitivity and specificity at a recall-favouring threshold."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if len(y) != len(s) or not len(y):
        raise ValueError(f"need as many truths as scores and at least one study, got {len(y)} and {len(s)}")
    t = threshold_for_sensitivity(y, s, target_sensitivity) if threshold is None else float(threshold)
    pred = s >= t
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {
        "n_studies": len(y),
        "n_positive": n_pos,
        "roc_auc": float(roc_auc_score(y, s)) if n_pos and n_neg else float("nan"),
        "threshold": t,
        "accuracy": (tp + tn) / len(y),
        "sensitivity": tp / n_pos if n_pos else float("nan"),
        "specificity": tn / n_neg if n_neg else float("nan"),
    }


def study_report_from_slices(slices: pd.DataFrame, labels: pd.DataFrame, metadata: pd.DataFrame,
                             target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY, pooling: str = "max",
                             threshold: float | None = None) -> dict[str, float]:
    """The study-level report of slice predictions (``image_id``, ``any``) against slice labels."""
    prob = study_probability(slices, metadata, pooling)
    truth = study_truth(labels.loc[labels["image_id"].isin(slices["image_id"])], metadata)
    if not prob.index.equals(truth.index):
        raise ValueError("predicted and labelled slices cover different studies; score OOF against the train labels")
    return study_level_report(truth.to_numpy(), prob.to_numpy(), target_sensitivity, threshold)
