"""Level-1 embeddings as level 1 writes them, for the level-2 benchmark at the real size.

``write_fabricated_work`` builds its embeddings whole in float64 (fine for tests, 14 GB for one
2048-wide model at the real size); here each fold file is written in chunks straight to disk
(float16 ``.npy``, rows in the order of the fold's own tables), so the benchmark's process holds
no more than a chunk and one model's test latents. Each image has a latent of LATENT dims (its
noisy true logits, then noise), the same for every fold model; fold model k sees it through its
own sparse mixing (each dim the signed sum of two latent dims: linear like a dense matrix, so the
fold models share no feature space, at a fraction of a matmul's cost), plus a positive offset as
pooled ReLU features have. LATENT > 256 keeps the top 256 principal components real variance.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from level2_stacking.frame import EMBEDDINGS_OOF_FILE, EMBEDDINGS_TEST_FILE, OOF_FILE, TEST_FILE

LATENT = 320
CHUNK = 16_384  # rows written at a time


def _latent(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(rows, LATENT) float32: the true logits (+-2) with noise, then pure noise."""
    out = rng.standard_normal((len(y), LATENT), dtype=np.float32)
    out[:, :len(LABELS)] += np.where(y > 0, 1.5, -2.5).astype(np.float32)
    return out


def _mixing(width: int, rng: np.random.Generator):
    """One fold model's linear view of the latents: dim j = s1 * latent[a_j] + s2 * latent[b_j] + 0.5."""
    a, b = rng.integers(0, LATENT, width), rng.integers(0, LATENT, width)
    sa, sb = (rng.choice(np.array([-1.0, 1.0], np.float32), width) for _ in range(2))

    def view(latent: np.ndarray) -> np.ndarray:
        out = np.take(latent, a, axis=1)
        out *= sa
        out += np.take(latent, b, axis=1) * sb
        out += 0.5
        return out
    return view


def _write_npy(path: Path, rows: int, width: int, chunks) -> None:
    """A float16 (rows, width) .npy written chunk by chunk (no memory map: the page cache is not
    charged to this process)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                "shape": (rows, width)})
        written = 0
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=np.float16).tobytes())
            written += len(chunk)
    if written != rows:
        raise RuntimeError(f"{path}: wrote {written} rows of {rows}")


def write_embeddings(root: Path, labels: pd.DataFrame, widths: Mapping[str, int], seed: int = 0) -> None:
    """``fold<k>/embeddings_oof.npy`` and ``embeddings_test.npy`` of width ``widths[model]`` in each
    model folder under ``root`` (whose fold tables ``write_fabricated_work`` wrote)."""
    y_of = labels.set_index("image_id")[list(LABELS)]
    for i, (model, width) in enumerate(widths.items()):
        folder = Path(root) / model
        folds = sorted(folder.glob("fold*"))
        test_ids = pd.read_parquet(folds[0] / TEST_FILE, columns=["image_id"])["image_id"].to_numpy()
        rng = np.random.default_rng(seed + 7919 * (i + 1))
        test_latent = _latent(y_of.loc[test_ids].to_numpy(), rng)  # one model's: 155 MB at the real size
        test_at = pd.Index(test_ids)
        for k, fold in enumerate(folds):
            mix = _mixing(width, rng)
            oof_ids = pd.read_parquet(fold / OOF_FILE, columns=["image_id"])["image_id"].to_numpy()
            y = y_of.loc[oof_ids].to_numpy()
            _write_npy(fold / EMBEDDINGS_OOF_FILE, len(oof_ids), width,
                       (mix(_latent(y[s:s + CHUNK], rng)) for s in range(0, len(y), CHUNK)))
            ids = pd.read_parquet(fold / TEST_FILE, columns=["image_id"])["image_id"].to_numpy()
            order = test_at.get_indexer(ids)  # each fold's test table has its own order
            _write_npy(fold / EMBEDDINGS_TEST_FILE, len(ids), width,
                       (mix(test_latent[order[s:s + CHUNK]]) for s in range(0, len(ids), CHUNK)))
