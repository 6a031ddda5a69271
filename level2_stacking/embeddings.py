"""Level-1 embeddings for the sequence model: read per fold model, reduced into one shared space.

Fold model k writes ``fold<k>/embeddings_oof.npy`` (its held-out rows) and ``embeddings_test.npy``
(every test image). Fold models are trained apart, so their feature spaces differ (any rotation
of one is as good as another): sequence model k learns on the other folds' rows, whose
embeddings come from the other fold models, and predicts fold k's rows from fold model k's. So
every fold model's embeddings are mapped linearly into one reference space before anything
learns from them. The map is fitted on the test images, which every fold model embeds, without
labels: the reference is the top principal components (whitened) of the first fold model's test
embeddings, and fold model k's map is the ridge regression of those coordinates on its own test
embeddings. Each (rows x D) float16 file is read through a memory map in chunks: at the real
scale one model's train embeddings are 3.5 GB, never held whole.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from level2_stacking.frame import EMBEDDINGS_OOF_FILE, EMBEDDINGS_TEST_FILE, OOF_FILE, TEST_FILE, fold_dir

CHUNK_ROWS = 65_536
RANK_TOL = 1e-6  # eigenvalues below this share of the largest are treated as zero
RIDGE = 1e-2  # ridge strength, relative to the mean variance of a fold model's embedding dims


@dataclass(frozen=True)
class FoldEmbeddings:
    oof: np.ndarray       # (n_val, D) memory map, rows as fold<k>/oof.parquet
    oof_ids: np.ndarray   # image ids of those rows
    test: np.ndarray      # (n_test, D) memory map, rows as fold<k>/test.parquet
    test_ids: np.ndarray


def open_embeddings(model_dir: Path, fold_ids: Sequence[int]) -> dict[int, FoldEmbeddings] | None:
    """Every fold's embeddings of one model, or None when any fold lacks them (a folder from before
    level 1 wrote embeddings). Row counts that do not match their tables are an error."""
    out: dict[int, FoldEmbeddings] = {}
    for k in fold_ids:
        folder = fold_dir(model_dir, k)
        paths = [folder / EMBEDDINGS_OOF_FILE, folder / EMBEDDINGS_TEST_FILE]
        if not all(p.is_file() for p in paths):
            return None
        arrays, ids = [], []
        for path, table in zip(paths, (OOF_FILE, TEST_FILE)):
            array = np.load(path, mmap_mode="r")
            table_ids = pd.read_parquet(folder / table, columns=["image_id"])["image_id"].to_numpy()
            if array.ndim != 2 or len(array) != len(table_ids):
                raise ValueError(f"{path}: shape {array.shape} does not match the {len(table_ids)} rows of "
                                 f"{folder / table}; rerun that fold's prediction (`make oof`)")
            arrays.append(array)
            ids.append(table_ids)
        out[int(k)] = FoldEmbeddings(arrays[0], ids[0], arrays[1], ids[1])
    if len({e.oof.shape[1] for e in out.values()}) > 1:
        raise ValueError(f"{model_dir}: the fold models' embedding widths differ")
    return out


def _moments(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and centred Gram matrix (D, D) in float64, in chunks."""
    n, d = array.shape
    total, gram = np.zeros(d), np.zeros((d, d))
    for start in range(0, n, CHUNK_ROWS):
        chunk = np.asarray(array[start:start + CHUNK_ROWS], dtype=np.float64)
        total += chunk.sum(axis=0)
        gram += chunk.T @ chunk
    mean = total / max(n, 1)
    return mean, gram - n * np.outer(mean, mean)


@dataclass(frozen=True)
class LinearMap:
    mean: np.ndarray    # (D,)
    weight: np.ndarray  # (D, r)

    def apply(self, array: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = (array[i] - mean) @ weight``, in chunks (``out`` may be float16)."""
        for start in range(0, len(array), CHUNK_ROWS):
            chunk = np.asarray(array[start:start + CHUNK_ROWS], dtype=np.float32) - self.mean.astype(np.float32)
            out[start:start + len(chunk)] = chunk @ self.weight.astype(np.float32)


def shared_space_maps(folds: dict[int, FoldEmbeddings], dim: int) -> dict[int, LinearMap]:
    """Fold -> the linear map of its embeddings into the shared reference space of ``dim`` dims."""
    first = min(folds)
    reference = folds[first].test
    n_test, d = reference.shape
    dim = max(1, min(dim, d, n_test - 1))
    mean, gram = _moments(reference)
    values, vectors = np.linalg.eigh(gram / max(n_test - 1, 1))
    order = np.argsort(values)[::-1]
    # Only directions with real variance: whitening a (numerically) null one divides by ~0 and
    # overflows float16 (seen with small CNNs, whose pooled features have a low rank).
    top = order[values[order] > RANK_TOL * max(float(values[order[0]]), 1e-30)][:dim]
    top = top if len(top) else order[:1]  # constant embeddings: one (zero) coordinate
    dim = len(top)
    to_ref = vectors[:, top] / np.sqrt(np.maximum(values[top], 1e-12))  # whitened principal components
    maps = {first: LinearMap(mean, to_ref)}
    for k, emb in folds.items():
        if k == first:
            continue
        # Row i of the reference pairs with row at[i] of this fold model's test embeddings.
        at = pd.Index(emb.test_ids).get_indexer(folds[first].test_ids)
        if len(emb.test_ids) != n_test or (at < 0).any():
            raise ValueError(f"fold{k}/{TEST_FILE} and fold{first}/{TEST_FILE} hold different test images; "
                             f"embeddings cannot be matched")
        in_order = bool((at == np.arange(n_test)).all())
        mean_k, gram_k = _moments(emb.test)
        cross = np.zeros((d, dim))  # centred (E_k)^T Z, chunked
        for start in range(0, n_test, CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS) if in_order else np.sort(at[start:start + CHUNK_ROWS])
            ek = np.asarray(emb.test[rows], dtype=np.float64) - mean_k
            if not in_order:  # back to the reference's order within the chunk
                ek = ek[np.argsort(np.argsort(at[start:start + CHUNK_ROWS]))]
            z = (np.asarray(reference[start:start + CHUNK_ROWS], dtype=np.float64) - mean) @ to_ref
            cross += ek.T @ z
        ridge = RIDGE * max(np.trace(gram_k) / d, 1e-12)
        maps[k] = LinearMap(mean_k, np.linalg.solve(gram_k + ridge * np.eye(d), cross))
    return maps
