"""The stack's study-level call: does this study bleed at all?

The max of the stacked `any` over a study's slices is a poor study score when the blend is tuned
for slice log loss (on the demo it ranked studies worse than one level-1 model). So level 2 keeps
a study model of its own: per study, the max of `any` of every candidate (LightGBM, the sequence
model, each level-1 model, their mean), mixed with simplex weights fitted to the studies' log loss
(a calibrated probability), or one candidate alone where that ranks the studies better (ROC AUC on
the studies it is fitted on; ties keep the mix). Fold k's studies are scored by the model chosen
on the other folds' studies only (a study's slices share one patient, hence one fold); the model
for test and `make predict` is chosen on every OOF study.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from competition.constants import LABELS
from level2_stacking.blend import fit_simplex

ANY = LABELS.index("any")


def study_features(candidates: np.ndarray, study_of_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted study ids (S,), (C, S) per-study max of each candidate's `any`); candidates (C, N, 6)."""
    codes, studies = pd.factorize(np.asarray(study_of_row), sort=True)
    if (codes < 0).any():
        raise ValueError("a slice has no study_id; rebuild the metadata from this DATA")
    frame = pd.DataFrame(np.asarray(candidates)[:, :, ANY].T)
    x = frame.groupby(codes, sort=True).max().to_numpy().T
    return np.asarray(studies), x


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # here: sklearn costs a second to import

    return float(roc_auc_score(truth, score))


@dataclass(frozen=True)
class StudyChoice:
    names: list[str]
    weights: np.ndarray  # (C,) on the simplex; one-hot where one candidate alone was chosen
    how: str

    def score(self, x: np.ndarray) -> np.ndarray:
        """(S,) study probabilities from the (C, S) per-study maxima."""
        return self.weights @ x

    def as_dict(self) -> dict:
        return {"how": self.how, "weights": dict(zip(self.names, self.weights.tolist()))}


def choose_study(names: list[str], truth: np.ndarray, x: np.ndarray) -> StudyChoice:
    """The mix fitted to the studies' log loss, or the single candidate ranking them best."""
    truth = np.asarray(truth, np.float64)
    mixed = fit_simplex(truth, x)
    if truth.all() or not truth.any():
        return StudyChoice(list(names), mixed, "mix by study log loss (one class only: AUC undefined)")
    options = [mixed, *np.eye(len(names))]
    aucs = [_auc(truth, w @ x) for w in options]
    best = int(np.argmax(aucs))  # the first of equals: the mix
    how = "mix by study log loss" if best == 0 else f"{names[best - 1]} alone (higher study AUC than the mix)"
    return StudyChoice(list(names), options[best], how)


@dataclass(frozen=True)
class NestedStudy:
    study_ids: np.ndarray
    truth: np.ndarray                 # (S,) 1 where a slice of the study is positive
    folds: np.ndarray                 # (S,) the fold of each study
    final: StudyChoice                # chosen on every OOF study: for test and `make predict`
    by_fold: dict[int, StudyChoice]   # fold k's, chosen on the other folds' studies
    oof: np.ndarray                   # (S,) nested study probabilities


def study_folds(folds: np.ndarray, study_of_row: np.ndarray, study_ids: np.ndarray) -> np.ndarray:
    """(S,) the fold of each study; a study split over folds is an error (folds group by patient)."""
    table = pd.DataFrame({"study": study_of_row, "fold": folds}).groupby("study")["fold"]
    if (table.nunique() > 1).any():
        raise ValueError("a study's slices lie in several folds; the folds table must group by patient")
    return table.first().reindex(study_ids).to_numpy()


def nested_study(names: list[str], candidates: np.ndarray, y_any: np.ndarray, folds: np.ndarray,
                 study_of_row: np.ndarray) -> NestedStudy:
    study_ids, x = study_features(candidates, study_of_row)
    truth = pd.Series(np.asarray(y_any)).groupby(pd.factorize(np.asarray(study_of_row), sort=True)[0]).max().to_numpy()
    s_folds = study_folds(folds, study_of_row, study_ids)
    oof = np.zeros(len(study_ids))
    by_fold = {}
    for k in np.unique(s_folds):
        held = s_folds == k
        by_fold[int(k)] = choice = choose_study(names, truth[~held], x[:, ~held])
        oof[held] = choice.score(x[:, held])
    return NestedStudy(study_ids, truth, s_folds, choose_study(names, truth, x), by_fold, oof)
