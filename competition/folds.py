"""Patient-grouped, stratified folds, written once and read by every later stage."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold


def make_folds(metadata: pd.DataFrame, labels: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign every labelled train image a fold, grouped by patient, stratified on patient `any`.

    Returns ``image_id, patient_id, fold`` sorted by image_id. Deterministic for a seed.
    """
    train = metadata.loc[metadata["split"] == "train", ["image_id", "patient_id"]]
    table = train.merge(labels[["image_id", "any"]], on="image_id", how="inner", validate="one_to_one")
    if table.empty:
        raise ValueError("no labelled train images: the metadata's train split and the labels share no image_id")
    patients = table.groupby("patient_id", sort=True)["any"].max()
    if len(patients) < n_folds:
        raise ValueError(f"{len(patients)} patients cannot fill {n_folds} folds; lower --folds")
    # Split the patient table itself (one row per patient), so no patient can span two folds,
    # stratified on patient positivity so each fold gets its share of positive patients.
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of = pd.Series(-1, index=patients.index, dtype=np.int64)
    for fold, (_, val) in enumerate(splitter.split(np.zeros(len(patients)), patients.to_numpy())):
        fold_of.iloc[val] = fold
    table["fold"] = table["patient_id"].map(fold_of).astype(np.int64)
    return table[["image_id", "patient_id", "fold"]].sort_values("image_id").reset_index(drop=True)
