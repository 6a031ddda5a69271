"""Level-1 outputs fabricated in the real layout for the README's five recommended models.

    python -m rehearsal fabricate --data DATA --work WORK

Each model gets, per fold, oof.parquet (its held-out rows), test.parquet (every test image) and
float16 embeddings of the model's real width (row i = row i of the table), then the assembled
oof.parquet and the mean test.parquet, as level1_models writes them. Probabilities and embeddings
are noisy views of the truth (level2_stacking.synthetic's FabricatedModel); embeddings are written
in blocks of BLOCK rows, so memory stays bounded at the real size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.labels import read_labels
from competition.layout import Layout
from competition.paths import WorkPaths
from level1_models.folder import ModelFolder
from level2_stacking.synthetic import FabricatedModel, _fold_views, _sigmoid, _true_logit

# The pooled feature width of each recommended spec's backbone (timm num_features): DenseNet-121
# 1024, the SE-ResNeXt / ResNeXt-101 ones 2048 (README: 2.8 GB and 5.6 GB of embeddings).
WIDTHS = {"rsna1st_densenet121": 1024, "rsna1st_seresnext101": 2048, "rsna2nd_resnext101_wsl": 2048,
          "rsna3rd_seresnext50": 2048, "rsna11th_seresnext50": 2048}
BLOCK = 16_384  # rows per block: 16,384 x 2048 float64 = 256 MiB at most


def _truth(data: Path, paths: WorkPaths) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, labels, fold per row (-1 = test), test mask): train rows of the folds, then test."""
    folds = pd.read_parquet(paths.folds)[["image_id", "fold"]]
    train = pd.read_parquet(paths.labels).set_index("image_id").loc[folds["image_id"], list(LABELS)]
    layout = Layout.find(data)
    layout.require("answers")
    test = read_labels(layout.answers).set_index("image_id")[list(LABELS)]
    ids = np.r_[folds["image_id"].to_numpy(), test.index.to_numpy()]
    y = np.r_[train.to_numpy(np.float64), test.to_numpy(np.float64)]
    fold = np.r_[folds["fold"].to_numpy(), np.full(len(test), -1)]
    return ids, y, fold, fold < 0


def _write_embeddings(path: Path, y: np.ndarray, rows: np.ndarray, mix: np.ndarray, rng: np.random.Generator) -> None:
    """A float16 .npy written block by block with plain writes: neither the whole array nor a memmap's
    dirty pages (which count as resident) are ever held."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": (len(rows), mix.shape[1])}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for at in range(0, len(rows), BLOCK):
            r = rows[at:at + BLOCK]
            view = _true_logit(y[r]) + rng.normal(0.0, 1.5, size=(len(r), len(LABELS)))
            f.write((np.c_[view, rng.normal(size=(len(r), 2))] @ mix).astype(np.float16).tobytes())


def fabricate(data: Path, paths: WorkPaths, seed: int = 0, widths: dict[str, int] | None = None) -> int:
    """Write every model's folder; return the number of prediction rows written (OOF + per-fold test)."""
    ids, y, fold, is_test = _truth(data, paths)
    test_rows = np.flatnonzero(is_test)
    fold_ids = sorted(set(fold[~is_test].tolist()))
    rows_written = 0
    for i, (name, width) in enumerate((widths or WIDTHS).items()):
        rng = np.random.default_rng([seed, i])
        model = FabricatedModel(noise=1.4 + 0.15 * i, embedding_dim=width)
        views = _fold_views(y, model, len(fold_ids), rng)
        base = rng.normal(size=(len(LABELS) + 2, width)) / np.sqrt(len(LABELS))
        folder = ModelFolder(paths.model_dir(name))
        oof_parts, test_probs = [], []
        for k, f in enumerate(fold_ids):
            rows = rng.permutation(np.flatnonzero(fold == f))
            order = rng.permutation(len(test_rows))
            folder.fold_dir(f).mkdir(parents=True, exist_ok=True)
            oof = pd.DataFrame(_sigmoid(views[k][rows]), columns=list(LABELS)).assign(fold=int(f))
            oof.insert(0, "image_id", ids[rows])
            p_test = _sigmoid(views[k][test_rows])
            test = pd.DataFrame(p_test[order], columns=list(LABELS))
            test.insert(0, "image_id", ids[test_rows][order])
            oof.to_parquet(folder.fold_oof(f), index=False)
            test.to_parquet(folder.fold_test(f), index=False)
            mix = base + 0.3 * rng.normal(size=base.shape) / np.sqrt(len(LABELS))  # each fold model its own space
            _write_embeddings(folder.embeddings(f, "oof"), y, rows, mix, rng)
            _write_embeddings(folder.embeddings(f, "test"), y, test_rows[order], mix, rng)
            folder.fold_done(f).write_text(json.dumps({"fold": int(f), "fabricated": True}))
            oof_parts.append(oof)
            test_probs.append(p_test)
            rows_written += len(rows) + len(test_rows)
        pd.concat(oof_parts, ignore_index=True).to_parquet(folder.oof, index=False)
        mean = pd.DataFrame(np.mean(test_probs, axis=0), columns=list(LABELS))
        mean.insert(0, "image_id", ids[test_rows])
        mean.to_parquet(folder.test, index=False)
    return rows_written
