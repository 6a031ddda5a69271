"""Folds: grouped by patient, stratified on patient-level `any`, deterministic for a seed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from competition.constants import LABELS
from competition.folds import make_folds


def fake_tables(n_patients: int = 80, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for p in range(n_patients):
        positive = rng.random() < 0.35
        for s in range(int(rng.integers(10, 30))):
            image_id = f"ID_{p:04x}{s:05x}"
            rows.append((image_id, "train", f"ID_{p:08x}"))
            labels.append((image_id, *([0] * 5), int(positive and rng.random() < 0.4)))
    for t in range(20):  # test images never get a fold
        rows.append((f"ID_ffff{t:05x}", "test", f"ID_f{t:07x}"))
    metadata = pd.DataFrame(rows, columns=["image_id", "split", "patient_id"])
    return metadata, pd.DataFrame(labels, columns=["image_id", *LABELS])


def test_no_patient_spans_two_folds_and_every_train_image_once():
    metadata, labels = fake_tables()
    folds = make_folds(metadata, labels, n_folds=5, seed=42)
    assert sorted(folds["image_id"]) == sorted(labels["image_id"])
    assert folds["image_id"].is_unique
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()
    assert set(folds["fold"]) == set(range(5))


def test_positive_patients_balanced_across_folds():
    metadata, labels = fake_tables(n_patients=120, seed=3)
    folds = make_folds(metadata, labels, n_folds=5, seed=7)
    patient_pos = folds.merge(labels, on="image_id").groupby("patient_id").agg(fold=("fold", "first"), pos=("any", "max"))
    per_fold = patient_pos.groupby("fold")["pos"].agg(["sum", "size"])
    assert per_fold["sum"].max() - per_fold["sum"].min() <= 1
    assert per_fold["size"].max() - per_fold["size"].min() <= 1


def test_deterministic_for_a_seed():
    metadata, labels = fake_tables()
    a = make_folds(metadata, labels, seed=1)
    pd.testing.assert_frame_equal(a, make_folds(metadata, labels, seed=1))
    assert not a["fold"].equals(make_folds(metadata, labels, seed=2)["fold"])


def test_too_few_patients_is_an_error():
    metadata, labels = fake_tables(n_patients=3)
    with pytest.raises(ValueError, match="5 stratified folds need at least 5 patients of each class"):
        make_folds(metadata, labels, n_folds=5)


def patient_any(positive: int, negative: int) -> pd.Series:
    return pd.Series([1] * positive + [0] * negative, index=[f"ID_{i:08x}" for i in range(positive + negative)])


def test_too_few_patients_per_class_names_counts_and_the_real_flag():
    # sklearn itself would only warn for 4 positives in 5 folds and leave a fold without any.
    metadata = pd.DataFrame({"image_id": [f"I{i}" for i in range(12)], "split": "train",
                             "patient_id": [f"P{i}" for i in range(12)]})
    labels = pd.DataFrame({"image_id": metadata["image_id"], "any": [1] * 4 + [0] * 8})
    with pytest.raises(ValueError) as info:
        make_folds(metadata, labels, n_folds=5)
    message = str(info.value)
    assert "4 any-positive and 8 negative patients" in message
    assert "--n-folds 4" in message and "N_FOLDS=4" in message and "--folds " not in message
    folds = make_folds(metadata, labels, n_folds=4)  # the advice works
    assert (folds.merge(labels)[lambda t: t["any"] == 1].groupby("fold").size() == 1).all()


def test_one_positive_patient_cannot_be_stratified():
    from competition.folds import check_enough_patients

    with pytest.raises(ValueError, match="add patients of the rarer class"):
        check_enough_patients(patient_any(1, 20), 5)
    check_enough_patients(patient_any(0, 5), 5)  # one class only: nothing to stratify, enough patients


def late_positive_tables(seed: int, n_patients: int = 60) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patients of 3-8 images, ~40% positive; half the positive patients' first image is negative,
    so a patient's positivity must look past its first image."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 9, n_patients)
    patient = np.repeat(np.arange(n_patients), sizes)
    slice_no = np.arange(len(patient)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    positive = np.repeat(rng.random(n_patients) < 0.4, sizes)
    first_shows = np.repeat(rng.random(n_patients) < 0.5, sizes)
    any_ = positive & np.where(slice_no == 0, first_shows, rng.random(len(patient)) < 0.5)
    any_ |= positive & (slice_no == np.repeat(sizes, sizes) - 1)  # every positive patient has a positive image
    image_id = [f"ID_{p:04x}{s:05x}" for p, s in zip(patient, slice_no)]
    metadata = pd.DataFrame({"image_id": image_id, "split": "train", "patient_id": [f"ID_{p:08x}" for p in patient]})
    labels = pd.DataFrame(0, index=range(len(patient)), columns=list(LABELS))
    labels["any"] = any_.astype(int)
    labels.insert(0, "image_id", image_id)
    return metadata, labels


def test_folds_group_patients_and_balance_any_positive_patients_over_many_seeds():
    """A patient is positive when ANY of its images is; the folds split positive patients evenly."""
    for seed in range(30):
        metadata, labels = late_positive_tables(seed)
        folds = make_folds(metadata, labels, n_folds=5, seed=seed)
        assert sorted(folds["image_id"]) == sorted(labels["image_id"]) and folds["image_id"].is_unique, seed
        assert (folds.groupby("patient_id")["fold"].nunique() == 1).all(), seed
        truth = labels.merge(metadata, on="image_id").groupby("patient_id")["any"].max()
        fold_of = folds.groupby("patient_id")["fold"].first()
        per_fold = truth.groupby(fold_of).agg(["sum", "size"]).reindex(range(5), fill_value=0)
        assert per_fold["sum"].max() - per_fold["sum"].min() <= 1, (seed, per_fold["sum"].tolist())
        assert per_fold["size"].max() - per_fold["size"].min() <= 1, (seed, per_fold["size"].tolist())
