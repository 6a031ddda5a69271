"""A fabricated work folder with level-1 outputs, for tests and the feature benchmark.

Hemorrhages fill runs of consecutive slices, and each fabricated level-1 model sees every slice
through its own independent noise, so a slice's neighbours and its study carry real signal that
a single slice's probability lacks: exactly what the stacker is meant to exploit. Each fold
model adds noise of its own (see FabricatedModel), so per-fold test predictions differ from each
other and from their mean, as real fold models' do.
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
from level2_stacking.frame import EMBEDDINGS_OOF_FILE, EMBEDDINGS_TEST_FILE, OOF_FILE, TEST_FILE


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
    p = _sigmoid(_true_logit(y) + rng.normal(0.0, noise, size=y.shape))
    out = pd.DataFrame(p, columns=list(LABELS))
    out.insert(0, "image_id", labels["image_id"].to_numpy())
    return out


def _true_logit(y: np.ndarray) -> np.ndarray:
    return np.where(y > 0, 1.5, -2.5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class FabricatedModel:
    """How one fabricated level-1 model sees the slices.

    Each slice's logit is the truth plus ``noise`` (sd), of which the share ``shared`` is the
    model's own view (the same for every fold model) and the rest differs between fold models: an
    OOF row gets its fold model's draw, a test row one draw per fold model, and ``test.parquet``
    holds their mean, as level 1 writes it (averaging shrinks that part of the noise: the trap
    the per-fold test features avoid). ``test_shift`` is added to every test logit (a shift of
    the test distribution). ``embedding_dim`` > 0 writes embeddings: an independent noisy view
    of the truth (sd ``embedding_noise``), mixed into ``embedding_dim`` dims by a matrix of the
    model and rotated by a matrix of each fold model (fold models share no feature space).
    """

    noise: float
    shared: float = 0.5
    test_shift: float = 0.0
    embedding_dim: int = 0
    embedding_noise: float = 1.5


def _fold_views(y: np.ndarray, m: FabricatedModel, n_folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Logits of every row as each of the n_folds fold models sees it."""
    shared = rng.normal(0.0, m.noise * np.sqrt(m.shared), size=y.shape)
    own = m.noise * np.sqrt(1.0 - m.shared)
    return [_true_logit(y) + shared + rng.normal(0.0, own, size=y.shape) for _ in range(n_folds)]


def _embeddings(y: np.ndarray, m: FabricatedModel, n_folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    view = _true_logit(y) + rng.normal(0.0, m.embedding_noise, size=y.shape)
    latent = np.c_[view, rng.normal(size=(len(y), 2))] @ rng.normal(size=(len(LABELS) + 2, m.embedding_dim))
    out = []
    for _ in range(n_folds):
        rotation, _ = np.linalg.qr(rng.normal(size=(m.embedding_dim, m.embedding_dim)))
        out.append((latent @ rotation + rng.normal(0.0, 0.1, size=latent.shape)).astype(np.float16))
    return out


def write_fabricated_work(paths: WorkPaths, comp: FabricatedCompetition, models: Mapping[str, float | FabricatedModel],
                          seed: int = 0) -> None:
    """Write metadata/labels/folds and one level-1 folder per model (name -> noise sd or a
    FabricatedModel): oof.parquet, test.parquet and fold<k>/{oof,test}.parquet (+ embeddings)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    comp.metadata.to_parquet(paths.metadata, index=False)
    folds = comp.folds.set_index("image_id")["fold"]
    is_train = comp.labels["image_id"].isin(folds.index).to_numpy()
    comp.labels.loc[is_train].to_parquet(paths.labels, index=False)
    comp.folds.to_parquet(paths.folds, index=False)
    fold_ids = sorted(folds.unique())
    ids = comp.labels["image_id"].to_numpy()
    y = comp.labels[list(LABELS)].to_numpy(dtype=np.float64)
    row_fold = folds.reindex(ids).to_numpy()
    for i, (name, spec) in enumerate(models.items()):
        m = spec if isinstance(spec, FabricatedModel) else FabricatedModel(float(spec))
        rng = np.random.default_rng(seed + 1000 * (i + 1))
        views = _fold_views(y, m, len(fold_ids), rng)
        embeddings = _embeddings(y, m, len(fold_ids), rng) if m.embedding_dim else None
        folder = paths.model_dir(name)
        oof_parts, test_probs = [], []
        test_rows = np.flatnonzero(~is_train)
        for k, fold in enumerate(fold_ids):
            rows = np.flatnonzero(row_fold == fold)
            rows = rows[np.random.default_rng(seed + k).permutation(len(rows))]  # nothing may rely on row order
            oof_k = pd.DataFrame(_sigmoid(views[k][rows]), columns=list(LABELS))
            oof_k.insert(0, "fold", int(fold))
            oof_k.insert(0, "image_id", ids[rows])
            p_test = _sigmoid(views[k][test_rows] + m.test_shift)
            shuffled = np.random.default_rng(seed + 100 + k).permutation(len(test_rows))  # each fold its own order
            test_k = pd.DataFrame(p_test[shuffled], columns=list(LABELS))
            test_k.insert(0, "image_id", ids[test_rows][shuffled])
            (folder / f"fold{fold}").mkdir(parents=True, exist_ok=True)
            oof_k.to_parquet(folder / f"fold{fold}" / OOF_FILE, index=False)
            test_k.to_parquet(folder / f"fold{fold}" / TEST_FILE, index=False)
            if embeddings is not None:
                np.save(folder / f"fold{fold}" / EMBEDDINGS_OOF_FILE, embeddings[k][rows])
                np.save(folder / f"fold{fold}" / EMBEDDINGS_TEST_FILE, embeddings[k][test_rows][shuffled])
            oof_parts.append(oof_k)
            test_probs.append(p_test)
        oof = pd.concat(oof_parts, ignore_index=True).sample(frac=1.0, random_state=i)
        oof.to_parquet(folder / OOF_FILE, index=False)
        test = pd.DataFrame(np.mean(test_probs, axis=0), columns=list(LABELS))
        test.insert(0, "image_id", ids[test_rows])
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
