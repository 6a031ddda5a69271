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
    check_enough_patients(patients, n_folds)
    # Split the patient table itself (one row per patient), so no patient can span two folds,
    # stratified on patient positivity so each fold gets its share of positive patients.
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of = pd.Series(-1, index=patients.index, dtype=np.int64)
    for fold, (_, val) in enumerate(splitter.split(np.zeros(len(patients)), patients.to_numpy())):
        fold_of.iloc[val] = fold
    table["fold"] = table["patient_id"].map(fold_of).astype(np.int64)
    return table[["image_id", "patient_id", "fold"]].sort_values("image_id").reset_index(drop=True)


def check_enough_patients(patient_any: pd.Series, n_folds: int) -> None:
    """Every fold needs a patient of each class present (else its validation scores are undefined)."""
    if n_folds < 2:
        raise ValueError(f"--n-folds {n_folds}: K-fold needs at least 2 folds")
    positive, negative = int((patient_any > 0).sum()), int((patient_any == 0).sum())
    present = [n for n in (positive, negative) if n]
    if min(present) >= n_folds:
        return
    fewest = min(present)
    fix = (f"lower the number of folds (--n-folds {fewest}; make prepare N_FOLDS={fewest}) or add patients"
           if fewest >= 2 else "add patients of the rarer class")
    raise ValueError(f"{n_folds} stratified folds need at least {n_folds} patients of each class; the train split "
                     f"has {positive} any-positive and {negative} negative patients: {fix}")
