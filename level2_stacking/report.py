"""The stacking report: level-1 models, their plain mean, and the stacker, scored on OOF rows.

The stacker's rows are nested (its blend weights and `any` rule for fold k chosen on the other
folds only); the study-level table scores every source by the max of its `any` over each study's
slices, the stack's own study call included (level2_stacking.study_model).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.metric import per_label_log_loss, weighted_log_loss
from competition.study_level import DEFAULT_TARGET_SENSITIVITY, study_level_report, study_probability, study_truth

MEAN_ROW = "mean of level 1"
STACK_ROW = "stacker"
LGBM_ROW, SEQ_ROW, BLEND_ROW = "lightgbm", "sequence model", "blend"


def oof_sources(level1_oof: dict[str, np.ndarray], stack_oof: np.ndarray,
                components: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every prediction table the report scores, in report order: level 1, their mean, each level-2
    stacker (LightGBM, the sequence model, their blend) and the stack's final output."""
    return {**level1_oof, MEAN_ROW: np.mean(list(level1_oof.values()), axis=0), **(components or {}),
            STACK_ROW: stack_oof}


def score_table(y: np.ndarray, sources: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per source: weighted log loss overall, then each label's log loss."""
    rows = {name: {"weighted": weighted_log_loss(y, p), **per_label_log_loss(y, p)} for name, p in sources.items()}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["weighted", *LABELS])
    table.index.name = "source"
    return table


def study_table(
    image_ids: np.ndarray, y: np.ndarray, sources: dict[str, np.ndarray], metadata: pd.DataFrame,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY, thresholds: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Patient (study) level diagnosis of each source's `any`, at a recall-favouring threshold:
    chosen on these rows, or given per source (e.g. the OOF thresholds, applied to test)."""
    any_col = LABELS.index("any")
    truth = study_truth(pd.DataFrame({"image_id": image_ids, "any": y[:, any_col]}), metadata)
    rows = {}
    for name, p in sources.items():
        prob = study_probability(pd.DataFrame({"image_id": image_ids, "any": p[:, any_col]}), metadata)
        fixed = None if thresholds is None else thresholds[name]
        rows[name] = study_level_report(truth.to_numpy(), prob.reindex(truth.index).to_numpy(), target_sensitivity, fixed)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "source"
    return table


def format_table(table: pd.DataFrame, digits: int = 4) -> str:
    """Fixed-width text for the terminal."""
    return table.to_string(float_format=lambda v: f"{v:.{digits}f}")
