"""The tables a prediction writes: slices.csv, studies.csv and (when anything was skipped) skipped.csv."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from competition.atomic import write_csv
from competition.constants import LABELS

STUDY_POOLING = "max over the study's slices"


def study_table(slices: pd.DataFrame, threshold: dict) -> pd.DataFrame:
    """One row per study: slice count, each label's maximum over its slices, and the bleed decision
    of the max of `any` at the OOF threshold (chosen on the same pooling of the OOF predictions of
    what predicts), with the OOF sensitivity and specificity it gave beside it."""
    groups = slices.groupby("study_id", sort=False)
    table = groups[list(LABELS)].max()
    table.insert(0, "n_slices", groups.size())
    score = table["any"]
    t = threshold.get("threshold")
    if t is None:
        table["decision"] = "undetermined (no OOF threshold)"
    else:
        table["decision"] = np.where(score >= t, "bleed", "no bleed")
    table["threshold"] = t
    table["oof_sensitivity"] = threshold.get("sensitivity")
    table["oof_specificity"] = threshold.get("specificity")
    table["pooling"] = STUDY_POOLING
    return table.reset_index()


def write_tables(out: Path, slices: pd.DataFrame, studies: pd.DataFrame, skipped: pd.DataFrame) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "slices.csv", out / "studies.csv"]
    write_csv(written[0], slices)
    write_csv(written[1], studies)
    skipped_csv = out / "skipped.csv"
    if len(skipped):
        write_csv(skipped_csv, skipped)
        written.append(skipped_csv)
    else:
        skipped_csv.unlink(missing_ok=True)  # a rerun on a cleaned folder leaves no stale list
    return written
