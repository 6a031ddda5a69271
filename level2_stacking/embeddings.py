"""Level-1 embeddings for the sequence model: read per fold model, reduced into one shared space.

Fold model k writes ``fold<k>/embeddings_oof.npy`` (its held-out rows) and ``embeddings_test.npy``
(every test image). Fold models are trained apart, so their feature spaces differ (any rotation
of one is as good as another): sequence model k learns on the other folds' rows, whose
embeddings come from the other fold models, and predicts fold k's rows from fold model k's. So
every fold model's embeddings are mapped linearly into one reference space before anything
learns from them. The map is fitted on the test images, which every fold model embeds, without
labels: the reference is the top principal components (whitened) of the first fold model's test
embeddings, and fold model k's map is the ridge regression of those coordinates on its own test
embeddings. Each (rows x D) float16 file is read through a memory map in chunks of at most
CHUNK_BYTES as float32 (sums in float64): at the real scale one model's train embeddings are
3.5 GB, never held whole, and the memory these maps take does not grow with the rows: at most
about 3 x CHUNK_BYTES of chunks plus O(D^2) float64 moments (2048 dims: 32 MiB each).
"""
from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from level2_stacking.frame import EMBEDDINGS_OOF_FILE, EMBEDDINGS_TEST_FILE, OOF_FILE, TEST_FILE, fold_dir

CHUNK_BYTES = 64 * 2**20  # one float32 chunk of rows; the bound on this module's memory is a few of these
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


def chunk_rows(width: int) -> int:
    """Rows per chunk so that one float32 chunk of ``width`` columns stays within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(width, 1)))


def release(array: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped file that this process has read (the page cache keeps
    them): otherwise resident memory grows by every embedding file read, 25 GB for the five
    recipes' models at the real size, which a memory limit would count."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _moments(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and centred Gram matrix (D, D) in float64, from float32 chunks of at most
    CHUNK_BYTES. Sums are taken about the first row (a shift), so that a large mean does not
    cancel the small spread when the outer product of the mean is subtracted."""
    n, d = array.shape
    if n == 0:
        return np.zeros(d), np.zeros((d, d))
    shift = np.asarray(array[0], dtype=np.float32)
    total, gram = np.zeros(d), np.zeros((d, d))
    step = chunk_rows(d)
    for start in range(0, n, step):
        chunk = np.asarray(array[start:start + step], dtype=np.float32)
        release(array)
        chunk -= shift
        total += chunk.sum(axis=0, dtype=np.float64)
        gram += chunk.T @ chunk
    offset = total / n  # mean - shift
    return shift + offset, gram - n * np.outer(offset, offset)


@dataclass(frozen=True)
class LinearMap:
    mean: np.ndarray    # (D,)
    weight: np.ndarray  # (D, r)

    def apply(self, array: np.ndarray, out: np.ndarray, rows: np.ndarray | None = None) -> None:
        """``out[i] = (array[i] - mean) @ weight`` (or ``out[rows[i]]``), in float32 chunks of at
        most CHUNK_BYTES; ``out`` may be float16 and a column block of a wider array."""
        mean, weight = self.mean.astype(np.float32), self.weight.astype(np.float32)
        step = chunk_rows(max(array.shape[1], weight.shape[1]))
        for start in range(0, len(array), step):
            chunk = np.asarray(array[start:start + step], dtype=np.float32)
            release(array)
            chunk -= mean
            at = slice(start, start + len(chunk)) if rows is None else rows[start:start + len(chunk)]
            out[at] = chunk @ weight


def _reference(folds: dict[int, FoldEmbeddings], dim: int) -> LinearMap:
    """The whitened top principal components of the first fold model's test embeddings."""
    reference = folds[min(folds)].test
    n_test, d = reference.shape
    if n_test < 2:
        raise ValueError(f"the shared embedding space is fitted on the test images and needs at least 2 of them "
                         f"({n_test} here); give level 2 more test images or run it without embeddings "
                         f"(python -m level2_stacking --no-embeddings)")
    dim = max(1, min(dim, d, n_test - 1))
    mean, gram = _moments(reference)
    values, vectors = np.linalg.eigh(gram / (n_test - 1))
    order = np.argsort(values)[::-1]
    # Only directions with real variance: whitening a (numerically) null one divides by ~0 and
    # overflows float16 (seen with small CNNs, whose pooled features have a low rank).
    top = order[values[order] > RANK_TOL * max(float(values[order[0]]), 1e-30)][:dim]
    top = top if len(top) else order[:1]  # constant embeddings: one (zero) coordinate
    return LinearMap(mean, vectors[:, top] / np.sqrt(np.maximum(values[top], 1e-12)))


def _cross(emb: FoldEmbeddings, mean_k: np.ndarray, reference: np.ndarray, to_ref: LinearMap,
           at: np.ndarray) -> np.ndarray:
    """Centred (E_k)^T Z (D, r) in float64, where row i of the reference pairs with row at[i] of
    fold model k's test embeddings; float32 chunks of at most CHUNK_BYTES."""
    d, r = to_ref.weight.shape
    n_test = len(at)
    in_order = bool((at == np.arange(n_test)).all())
    step = chunk_rows(d)
    cross, z = np.zeros((d, r)), np.empty((min(step, n_test), r), np.float32)
    mean_k = mean_k.astype(np.float32)
    for start in range(0, n_test, step):
        pair = at[start:start + step]
        rows = slice(start, start + len(pair)) if in_order else np.sort(pair)  # sorted: a memory map reads forward
        ek = np.asarray(emb.test[rows], dtype=np.float32)
        release(emb.test)
        ek -= mean_k
        if not in_order:  # back to the reference's order within the chunk
            ek = ek[np.argsort(np.argsort(pair))]
        to_ref.apply(reference[start:start + len(pair)], z[:len(pair)])
        cross += ek.T @ z[:len(pair)]
    return cross


def shared_space_maps(folds: dict[int, FoldEmbeddings], dim: int) -> dict[int, LinearMap]:
    """Fold -> the linear map of its embeddings into the shared reference space of ``dim`` dims.
    Memory: a few CHUNK_BYTES chunks and O(D^2) float64, whatever the rows."""
    first = min(folds)
    to_ref = _reference(folds, dim)
    maps = {first: to_ref}
    n_test, d = folds[first].test.shape
    for k, emb in folds.items():
        if k == first:
            continue
        # Row i of the reference pairs with row at[i] of this fold model's test embeddings.
        at = pd.Index(emb.test_ids).get_indexer(folds[first].test_ids)
        if len(emb.test_ids) != n_test or (at < 0).any():
            raise ValueError(f"fold{k}/{TEST_FILE} and fold{first}/{TEST_FILE} hold different test images; "
                             f"embeddings cannot be matched")
        mean_k, gram_k = _moments(emb.test)
        cross = _cross(emb, mean_k, folds[first].test, to_ref, at)
        ridge = RIDGE * max(np.trace(gram_k) / d, 1e-12)
        maps[k] = LinearMap(mean_k, np.linalg.solve(gram_k + ridge * np.eye(d), cross))
    return maps
