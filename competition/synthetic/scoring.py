"""Scoring a submission against a synthetic competition's answers (the competition metric)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.metric import per_label_log_loss, weighted_log_loss


def _read_long(path: Path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} not found")
    table = pd.read_csv(path, dtype={"ID": str})  # .csv.gz is read by the suffix
    if list(table.columns[:2]) != ["ID", "Label"]:
        raise ValueError(f"{what} {path}: expected the Kaggle header `ID,Label`, got {list(table.columns)}")
    dup = table["ID"][table["ID"].duplicated()]
    if len(dup):
        raise ValueError(f"{what} {path}: id {dup.iloc[0]} is listed more than once")
    return table


def score_submission(submission_path: Path | str, answers_path: Path | str) -> dict[str, float]:
    """The competition metric of a long-format submission (csv or csv.gz) against the answers file.

    Returns {"weighted_log_loss": ..., "<label>": mean log loss of that label, ...}. The ids must
    match the answers' exactly: a missing or extra id is a ValueError naming the first one.
    """
    sub = _read_long(Path(submission_path), "submission")
    ans = _read_long(Path(answers_path), "answers")
    sub_ids = set(sub["ID"])
    missing = ans["ID"][~ans["ID"].isin(sub_ids)]
    if len(missing):
        raise ValueError(f"submission lacks id {missing.iloc[0]} ({len(missing)} missing in all)")
    extra = sub["ID"][~sub["ID"].isin(set(ans["ID"]))]
    if len(extra):
        raise ValueError(f"submission has id {extra.iloc[0]}, which is not in the answers ({len(extra)} extra in all)")

    pred = pd.to_numeric(sub["Label"], errors="coerce")
    bad = pred.isna() | (pred < 0) | (pred > 1)
    if bad.any():
        raise ValueError(f"submission: id {sub['ID'][bad].iloc[0]} has Label {sub['Label'][bad].iloc[0]!r}; "
                         f"expected a probability in [0, 1]")
    parts = ans["ID"].str.rsplit("_", n=1)
    image, label = parts.str[0], parts.str[1]
    if not label.isin(LABELS).all():
        raise ValueError(f"answers: id {ans['ID'][~label.isin(LABELS)].iloc[0]} names no known label")
    truth = (pd.DataFrame({"image": image, "label": label, "y": ans["Label"].astype(float)})
             .pivot(index="image", columns="label", values="y").reindex(columns=list(LABELS)))
    by_id = pd.Series(pred.to_numpy(), index=sub["ID"])
    ids = np.char.add(np.repeat(truth.index.to_numpy().astype(str), len(LABELS)),
                      np.tile([f"_{c}" for c in LABELS], len(truth)))
    y_pred = by_id.loc[ids].to_numpy().reshape(len(truth), len(LABELS))
    y_true = truth.to_numpy()
    if np.isnan(y_true).any():
        raise ValueError("answers: some image lacks one of the six labels")
    return {"weighted_log_loss": weighted_log_loss(y_true, y_pred), **per_label_log_loss(y_true, y_pred)}
