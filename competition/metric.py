"""The competition metric: weighted multi-label binary log loss.

Each (image, label) pair contributes a binary log loss; `any` weighs 2, each subtype 1; the score
is the weighted mean over all pairs. Probabilities are clipped into [1e-15, 1 - 1e-15], as the
competition's (Kaggle's) log loss did.
"""
from __future__ import annotations

import numpy as np

from competition.constants import LABEL_WEIGHTS, LABELS

EPS = 1e-15  # as Kaggle's log loss clipped (not 1e-7: a confident miss costs 34.5 nats there, not 16.1)


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != len(LABELS):
        raise ValueError(f"expected two (N, {len(LABELS)}) arrays in LABELS order, got {y_true.shape} and {y_pred.shape}")
    if np.isnan(y_pred).any():
        raise ValueError("predictions contain NaN")
    return y_true, y_pred


def pairwise_log_loss(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Binary log loss of every (image, label) pair, shape (N, 6)."""
    y_true, y_pred = _check(y_true, y_pred)
    p = np.clip(y_pred, eps, 1 - eps)
    return -(y_true * np.log(p) + (1 - y_true) * np.log1p(-p))


def weighted_log_loss(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> float:
    """The leaderboard score (lower is better)."""
    losses = pairwise_log_loss(y_true, y_pred, eps)
    return float((losses * LABEL_WEIGHTS).sum() / (LABEL_WEIGHTS.sum() * len(losses)))


def per_label_log_loss(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> dict[str, float]:
    """Mean log loss of each label, in LABELS order."""
    losses = pairwise_log_loss(y_true, y_pred, eps).mean(axis=0)
    return {label: float(v) for label, v in zip(LABELS, losses)}


def prior_baseline(y_train: np.ndarray, n: int) -> np.ndarray:
    """The constant-prior prediction (each label's training rate) for n rows."""
    rates = np.asarray(y_train, dtype=np.float64).mean(axis=0)
    return np.tile(rates, (n, 1))
