"""A fabricated work folder with level-1 outputs, for tests and the feature benchmark.

Hemorrhages fill runs of consecutive slices, and each fabricated level-1 model sees every slice
through its own independent noise, so a slice's neighbours and its study carry real signal that
a single slice's probability lacks: exactly what the stacker is meant to exploit.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.labels import labels_to_long
from competition.layout import ANSWERS_NAME
from competition.paths import WorkPaths
from level2_stacking.frame import OOF_FILE, TEST_FILE


@dataclass(frozen=True)
class FabricatedCompetition:
    metadata: pd.DataFrame  # image_id, split, patient_id, study_id, series_id, z, slice_index, n_slices
    labels: pd.DataFrame    # image_id + LABELS, train and test (test = the answers)
    folds: pd.DataFrame     # image_id, patient_id, fold (train only)


def fabricate_competition(n_patients: int = 200, n_test_patients: int = 50, slices: tuple[int, int] = (16, 40),
                          n_folds: int = 5, positive_rate: float = 0.4, seed: int = 0) -> FabricatedCompetition:
    rng = np.random.default_rng(seed)
    meta_parts, label_parts = [], []
    image_counter = 0
    for p in range(n_patients + n_test_patients):
        split = "train" if p < n_patients else "test"
        n = int(rng.integers(slices[0], slices[1] + 1))
        y = np.zeros((n, len(LABELS)), dtype=np.int8)
        if rng.random() < positive_rate:
            for sub in rng.choice(len(LABELS) - 1, size=int(rng.integers(1, 3)), replace=False):
                length = int(rng.integers(2, max(3, n // 3)))
                start = int(rng.integers(0, n - length + 1))
                y[start:start + length, sub] = 1
        y[:, -1] = y[:, :-1].max(axis=1)
        ids = [f"ID_{image_counter + i:09x}" for i in range(n)]
        image_counter += n
        z = np.arange(n) * 5.0 + rng.normal(0, 0.01)
        meta_parts.append(pd.DataFrame({
            "image_id": ids, "split": split, "patient_id": f"ID_p{p:07d}", "study_id": f"ID_s{p:07d}",
            "series_id": f"ID_r{p:07d}", "z": z, "slice_index": np.arange(n), "n_slices": n,
        }))
        label_parts.append(pd.DataFrame(y, columns=list(LABELS)).assign(image_id=ids))
    metadata = pd.concat(meta_parts, ignore_index=True)
    labels = pd.concat(label_parts, ignore_index=True)[["image_id", *LABELS]]
    train = metadata.loc[metadata["split"] == "train", ["image_id", "patient_id"]]
    patient_fold = pd.Series(rng.permutation(n_patients) % n_folds, index=train["patient_id"].unique())
    folds = train.assign(fold=train["patient_id"].map(patient_fold).astype(np.int64))
    folds = folds.sort_values("image_id").reset_index(drop=True)
    # Shuffle the metadata rows: nothing may rely on its order.
    metadata = metadata.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return FabricatedCompetition(metadata, labels.sort_values("image_id").reset_index(drop=True), folds)


def fabricate_predictions(labels: pd.DataFrame, noise: float, seed: int) -> pd.DataFrame:
    """A level-1 model's probabilities: true logit +/-2 blurred by independent per-slice noise."""
    rng = np.random.default_rng(seed)
    y = labels[list(LABELS)].to_numpy(dtype=np.float64)
    logit = np.where(y > 0, 1.5, -2.5) + rng.normal(0.0, noise, size=y.shape)
    p = 1.0 / (1.0 + np.exp(-logit))
    out = pd.DataFrame(p, columns=list(LABELS))
    out.insert(0, "image_id", labels["image_id"].to_numpy())
    return out


def write_fabricated_work(paths: WorkPaths, comp: FabricatedCompetition, models: Mapping[str, float], seed: int = 0) -> None:
    """Write metadata/labels/folds and one level-1 folder per model (name -> noise level)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    comp.metadata.to_parquet(paths.metadata, index=False)
    train_ids = set(comp.folds["image_id"])
    comp.labels.loc[comp.labels["image_id"].isin(train_ids)].to_parquet(paths.labels, index=False)
    comp.folds.to_parquet(paths.folds, index=False)
    for i, (name, noise) in enumerate(models.items()):
        preds = fabricate_predictions(comp.labels, noise, seed=seed + 1000 * (i + 1))
        oof = preds.loc[preds["image_id"].isin(train_ids)].merge(comp.folds[["image_id", "fold"]], on="image_id")
        test = preds.loc[~preds["image_id"].isin(train_ids)].reset_index(drop=True)
        folder = paths.model_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        oof[["image_id", "fold", *LABELS]].sample(frac=1.0, random_state=i).to_parquet(folder / OOF_FILE, index=False)
        test.to_parquet(folder / TEST_FILE, index=False)


def write_fabricated_data(root: Path, comp: FabricatedCompetition) -> Path:
    """A DATA folder holding what the stacker and the submission writer read from it: the test
    folder (empty: no images are needed), the sample submission and the test answers."""
    root = Path(root)
    (root / "stage_2_test").mkdir(parents=True, exist_ok=True)
    test_ids = comp.metadata.loc[comp.metadata["split"] == "test", "image_id"]
    answers = labels_to_long(comp.labels.loc[comp.labels["image_id"].isin(test_ids)])
    answers.to_csv(root / ANSWERS_NAME, index=False)
    answers.assign(Label=0.5).to_csv(root / "stage_2_sample_submission.csv", index=False)
    return root
