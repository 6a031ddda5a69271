"""The stack's study-level call: does this study bleed at all?

The study's probability is the max over its slices of the stack's final `any` (after the blend
and the `any` rule): out of fold, fold k's slices come from the weights and rule chosen on the
other folds, so the OOF study scores are nested and on the same scale as the final stack's, which
`make predict` applies with the threshold chosen on them.

Study models fitted on the studies themselves were measured and lost to this pooling where the
studies were enough to tell (the demo's 96 and a 338-study synthetic competition; README, level 2):
simplex mixes of each candidate's max fitted to the studies' log loss, the single candidate with
the best in-sample AUC, logistic regressions on the candidates' logits and a Platt map of the
pooled max each ranked the held-out studies worse, as each refit per fold adds its own noise
and scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from competition.constants import LABELS

ANY = LABELS.index("any")
POOLING = "max over the study's slices of the stack's `any`"


def study_max(p_any: np.ndarray, study_of_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted study ids (S,), (S,) the max of ``p_any`` over each study's rows)."""
    codes, studies = pd.factorize(np.asarray(study_of_row), sort=True)
    if (codes < 0).any():
        raise ValueError("a slice has no study_id; rebuild the metadata from this DATA")
    return np.asarray(studies), pd.Series(np.asarray(p_any, np.float64)).groupby(codes, sort=True).max().to_numpy()


def study_folds(folds: np.ndarray, study_of_row: np.ndarray, study_ids: np.ndarray) -> np.ndarray:
    """(S,) the fold of each study; a study split over folds is an error (folds group by patient)."""
    table = pd.DataFrame({"study": study_of_row, "fold": folds}).groupby("study")["fold"]
    if (table.nunique() > 1).any():
        raise ValueError("a study's slices lie in several folds; the folds table must group by patient")
    return table.first().reindex(study_ids).to_numpy()


@dataclass(frozen=True)
class NestedStudy:
    study_ids: np.ndarray
    truth: np.ndarray   # (S,) 1 where a slice of the study is positive
    folds: np.ndarray   # (S,) the fold of each study
    oof: np.ndarray     # (S,) the max of the nested OOF `any` over each study's slices


def nested_study(oof_any: np.ndarray, y_any: np.ndarray, folds: np.ndarray, study_of_row: np.ndarray) -> NestedStudy:
    """The OOF study scores from the stack's nested OOF `any` (N,) and the slices' truth (N,)."""
    study_ids, oof = study_max(oof_any, study_of_row)
    _, truth = study_max(y_any, study_of_row)
    return NestedStudy(study_ids, truth, study_folds(folds, study_of_row, study_ids), oof)
