"""Scores of level-1 predictions: the competition metric overall and per label, and ROC AUC."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from competition.constants import LABELS
from competition.metric import per_label_log_loss, prior_baseline, weighted_log_loss


def score(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Weighted log loss, per-label log loss and per-label ROC AUC (None where a label has one class)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    auc: dict[str, float | None] = {}
    for j, label in enumerate(LABELS):
        column = y_true[:, j]
        auc[label] = float(roc_auc_score(column, y_pred[:, j])) if 0 < column.sum() < len(column) else None
    return {
        "n": int(len(y_true)),
        "weighted_log_loss": weighted_log_loss(y_true, y_pred),
        "per_label_log_loss": per_label_log_loss(y_true, y_pred),
        "roc_auc": auc,
    }


def prior_score(y_train: np.ndarray, y_val: np.ndarray) -> float:
    """Weighted log loss of predicting each label's training rate for every validation image."""
    return weighted_log_loss(y_val, prior_baseline(y_train, len(y_val)))
