"""Level 2's choices over its candidates, nested: the slice blend and the `any` rule; the study call
is the max of the result over each study's slices (level2_stacking.study_model).

The candidates are the stackers fitted (LightGBM, the sequence model), each level-1 model and the
level-1 mean, in that order (``candidate_names``; the fitted stack rebuilds them in the same order
for new studies). A level-1 model's test candidate is the mean of its fold models' test
predictions, which is what `make predict` computes from the fold models.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from competition.constants import LABELS
from level2_stacking.blend import NestedBlend, nested_blend
from level2_stacking.frame import StackFrame
from level2_stacking.report import LGBM_ROW, MEAN_ROW, SEQ_ROW
from level2_stacking.study_model import NestedStudy, nested_study, study_max

ANY = LABELS.index("any")


def candidate_names(stackers: list[str], models: list[str]) -> list[str]:
    """The candidates' names in order; ``stackers`` holds LGBM_ROW and/or SEQ_ROW."""
    clash = sorted(set(models) & {LGBM_ROW, SEQ_ROW, MEAN_ROW})
    if clash:
        raise ValueError(f"level-1 model name(s) {clash} clash with level 2's own rows; rename the model folder")
    return [n for n in (LGBM_ROW, SEQ_ROW) if n in stackers] + list(models) + [MEAN_ROW]


def blend_names(stacker: str, names: list[str]) -> list[str]:
    """What the final slice prediction may mix: every candidate for the blend, else the one stacker."""
    return {"blend": names, "lgbm": [LGBM_ROW], "seq": [SEQ_ROW]}[stacker]


def level1_test(frame: StackFrame, model: str) -> np.ndarray:
    folds = frame.level1_fold_test.get(model)
    return np.mean([folds[k] for k in sorted(folds)], axis=0) if folds else frame.level1_test[model]


def assemble(frame: StackFrame, oof: dict, test: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, OOF candidates (C, N, 6), test candidates (C, M, 6)) from the stackers' outputs."""
    names = candidate_names(list(oof), frame.models)
    l1_oof = {m: frame.level1_oof[m] for m in frame.models}
    l1_test = {m: level1_test(frame, m) for m in frame.models}
    l1_oof[MEAN_ROW] = np.mean([l1_oof[m] for m in frame.models], axis=0)
    l1_test[MEAN_ROW] = np.mean([l1_test[m] for m in frame.models], axis=0)
    both_oof, both_test = {**oof, **l1_oof}, {**test, **l1_test}
    return names, np.stack([both_oof[n] for n in names]), np.stack([both_test[n] for n in names])


@dataclass(frozen=True)
class Level2Choices:
    names: list[str]
    blend_names: list[str]
    blend: NestedBlend
    study: NestedStudy
    test_blend: np.ndarray        # (M, 6) the final weights on the test candidates
    test: np.ndarray              # (M, 6) and the final `any` rule
    test_study_ids: np.ndarray
    test_study: np.ndarray        # (S_test,) the max of ``test``'s `any` over each test study

    def oof_studies(self) -> pd.DataFrame:
        return pd.DataFrame({"study_id": self.study.study_ids, "fold": self.study.folds, "probability": self.study.oof})

    def test_studies(self) -> pd.DataFrame:
        return pd.DataFrame({"study_id": self.test_study_ids, "probability": self.test_study})


def choose(frame: StackFrame, stacker: str, oof: dict, test: dict, study_of: pd.Series,
           blend_form: str = "per label") -> Level2Choices:
    """Every choice nested over the folds; ``study_of``: image_id -> study_id."""
    names, cand_oof, cand_test = assemble(frame, oof, test)
    chosen = blend_names(stacker, names)
    at = [names.index(n) for n in chosen]
    nested = nested_blend(chosen, frame.y, frame.folds, cand_oof[at], blend_form)
    test_blend, test_final = nested.final.apply(cand_test[at])
    train_studies = study_of.reindex(frame.train_ids).to_numpy()
    study = nested_study(nested.oof[:, ANY], frame.y[:, ANY], frame.folds, train_studies)
    test_ids, test_study = (study_max(test_final[:, ANY], study_of.reindex(frame.test_ids).to_numpy())
                            if len(frame.test_ids) else (np.array([]), np.zeros(0)))
    return Level2Choices(names, chosen, nested, study, test_blend, test_final, test_ids, test_study)
