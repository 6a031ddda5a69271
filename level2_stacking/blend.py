"""Blending the stackers and the `any` post-processing, both decided on OOF predictions only.

The blend is, per label, ``w * p_a + (1 - w) * p_b`` with ``w`` on a grid of 0.05 steps chosen
for the lowest OOF log loss of that label: six numbers fitted on 750k rows (or a few thousand on
the demo) leave little to overfit, and the test figure is reported beside it.

`any` is at least every subtype's probability (a slice with a subtype bleeds); raising `any` to
the largest subtype probability is kept only where it lowers the OOF loss.
"""
from __future__ import annotations

import numpy as np

from competition.constants import LABELS
from competition.metric import pairwise_log_loss, weighted_log_loss

GRID = np.round(np.linspace(0.0, 1.0, 21), 2)
ANY = LABELS.index("any")


def fit_blend_weights(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> np.ndarray:
    """(6,) weight of ``p_a`` per label minimising each label's OOF log loss."""
    losses = np.stack([pairwise_log_loss(y, w * p_a + (1 - w) * p_b).mean(axis=0) for w in GRID])  # (grid, 6)
    return GRID[np.argmin(losses, axis=0)]


def blend(p_a: np.ndarray, p_b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weights * p_a + (1 - weights) * p_b


def any_at_least_subtypes(p: np.ndarray) -> np.ndarray:
    out = p.copy()
    out[:, ANY] = np.maximum(p[:, ANY], p[:, :ANY].max(axis=1))
    return out


def any_rule_gain(y: np.ndarray, p: np.ndarray) -> float:
    """OOF weighted log loss saved by the `any` rule (positive: it helps)."""
    return weighted_log_loss(y, p) - weighted_log_loss(y, any_at_least_subtypes(p))
