"""Patient-level diagnosis: does this study show a hemorrhage at all?

The slice model's ``any`` probabilities are pooled per study (max by default: one bleeding slice
makes a bleeding study), and the study-level operating point is chosen to favour recall (a missed
bleed costs more than a second look): the highest threshold whose sensitivity reaches the target.
The threshold is chosen on the same studies it is reported on, as the reference paper does; pass
``threshold=`` to score a threshold chosen elsewhere (the demo chooses it on OOF and applies it to
test). A study scoring exactly the threshold counts as positive: it cannot be told apart from the
positive study that set it, and a recall-favouring rule sends it for a second look.

Uncertainty comes from bootstrapping whole studies (slices of one study are not independent):
`bootstrap_auc` for ROC AUC, `paired_bootstrap_difference` for the weighted log loss of two models
scored on the same slices.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from competition.constants import LABEL_WEIGHTS
from competition.metric import pairwise_log_loss

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
    """The highest threshold t with sensitivity(score >= t) >= target (ties with t count as positive)."""
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
    from sklearn.metrics import roc_auc_score  # here: importing sklearn costs a second that skipped reruns need not pay

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
    truth, prob = _truth_and_probability(slices, labels, metadata, pooling)
    return study_level_report(truth, prob, target_sensitivity, threshold)


def _truth_and_probability(slices: pd.DataFrame, labels: pd.DataFrame, metadata: pd.DataFrame,
                           pooling: str = "max") -> tuple[np.ndarray, np.ndarray]:
    prob = study_probability(slices, metadata, pooling)
    truth = study_truth(labels.loc[labels["image_id"].isin(slices["image_id"])], metadata)
    if not prob.index.equals(truth.index):
        raise ValueError("predicted and labelled slices cover different studies; score OOF against the train labels")
    return truth.to_numpy(), prob.to_numpy()


def oof_threshold_on_test(oof: pd.DataFrame, oof_labels: pd.DataFrame, test: pd.DataFrame, test_labels: pd.DataFrame,
                          metadata: pd.DataFrame, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                          pooling: str = "max", n_boot: int = 2000) -> dict[str, float]:
    """The honest study-level figures of one model: the threshold reaching the target sensitivity
    on its OOF studies, applied unchanged to the test studies; test ROC AUC with its bootstrap
    interval; and how many studies (and positive ones) each side rests on."""
    y_oof, p_oof = _truth_and_probability(oof, oof_labels, metadata, pooling)
    y_test, p_test = _truth_and_probability(test, test_labels, metadata, pooling)
    return threshold_on_test(y_oof, p_oof, y_test, p_test, target_sensitivity, n_boot)


def threshold_on_test(y_oof: np.ndarray, p_oof: np.ndarray, y_test: np.ndarray, p_test: np.ndarray,
                      target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY, n_boot: int = 2000) -> dict[str, float]:
    """:func:`oof_threshold_on_test` for study probabilities given directly."""
    report = study_level_report(y_test, p_test, threshold=threshold_for_sensitivity(y_oof, p_oof, target_sensitivity))
    low, high = bootstrap_auc(y_test, p_test, n_boot=n_boot)
    return {**report, "auc_low": low, "auc_high": high, "oof_studies": len(y_oof), "oof_positive": int(y_oof.sum())}


def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) counts: how often each of n units is drawn in each bootstrap resample of size n."""
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n), dtype=np.int64)
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1)
    return counts


def bootstrap_auc(y_true: np.ndarray, score: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ROC AUC over studies (resamples with one class left are skipped).

    AUC of a resample = sum over (positive i, negative j) pairs of c_i c_j [s_i > s_j, 1/2 on ties]
    over (sum c_pos)(sum c_neg), with c the draw counts: the Mann-Whitney form, one matrix product.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if y.all() or not y.any():
        return float("nan"), float("nan")
    counts = _resample_counts(len(y), n_boot, seed)
    wins = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
    c_pos, c_neg = counts[:, y].astype(np.float64), counts[:, ~y].astype(np.float64)
    pairs = c_pos.sum(1) * c_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(pairs > 0, ((c_pos @ wins) * c_neg).sum(1) / pairs, np.nan)
    return _interval(auc, level)


def paired_bootstrap_difference(groups: np.ndarray, y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
                                n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Weighted log loss of a minus that of b on the same slices, with a percentile interval from
    resampling whole groups (studies): (difference, low, high). Negative means a is better."""
    y = np.asarray(y_true, dtype=np.float64)
    per_slice = [(pairwise_log_loss(y, p) * LABEL_WEIGHTS).sum(1) / LABEL_WEIGHTS.sum() for p in (pred_a, pred_b)]
    delta = per_slice[0] - per_slice[1]
    codes, uniques = pd.factorize(np.asarray(groups))
    group_delta = np.bincount(codes, weights=delta, minlength=len(uniques))
    group_size = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
    counts = _resample_counts(len(uniques), n_boot, seed).astype(np.float64)
    boot = (counts @ group_delta) / (counts @ group_size)
    low, high = _interval(boot, level)
    return float(delta.mean()), low, high


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    if np.isnan(values).all():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)
