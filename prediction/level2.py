"""The seam to level 2: a study's per-fold, per-model slice probabilities -> stacked probabilities.

The submission's stacked prediction is the mean over folds k of booster_k applied to the features
built from fold model k's own predictions (level2_stacking), with a sequence model and a blend.
Until that API is wired here, :func:`stack_study` raises :class:`Level2NotWired` and the
predictor reports the level-1 mean. Wiring needs from level 2: its fitted stackers saved under
``WorkPaths.stack`` (boosters per fold, sequence-model weights, blend weights; the branch seen on
2026-11-25 keeps them only in memory) and one public function that builds a study's features from
these per-fold inputs and applies them. ``export`` already carries every file under ``stack/``
but its tables.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


class Level2NotWired(NotImplementedError):
    """Level 2 is not wired into prediction yet."""


def stack_study(per_fold: dict[str, np.ndarray], metadata: pd.DataFrame,
                embeddings: dict[str, np.ndarray] | None = None, stack_dir=None) -> np.ndarray:
    """``per_fold[model]``: folds x slices x 6 probabilities of the slices of ``metadata`` (in its
    row order); ``embeddings[model]``: folds x slices x D pooled features of the same fold models
    (what the sequence model reads). Returns slices x 6 stacked probabilities."""
    raise Level2NotWired("level 2 not wired yet: prediction reports the level-1 mean over models and folds")
