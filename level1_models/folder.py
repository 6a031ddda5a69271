"""The files of one level-1 model's output folder (``WorkPaths.model_dir(name)``).

    config.json  metrics.json  oof.parquet  test.parquet  curves.png  curves_fold<k>.csv
    fold<k>/best.pt             the fold's best checkpoint (weights only)
    fold<k>/last.pt             resume state while the fold trains (last.prev.pt: the one before)
    fold<k>/oof.parquet         the fold's held-out images, predicted by fold model k
    fold<k>/test.parquet        every test image, predicted by fold model k alone
    fold<k>/embeddings_oof.npy  float16 pooled features, row i = row i of fold<k>/oof.parquet
    fold<k>/embeddings_test.npy float16 pooled features, row i = row i of fold<k>/test.parquet
    fold<k>/done.json           written last: the fold is finished

The embeddings are plain ``.npy`` files so that ``np.load(path, mmap_mode="r")`` reads any rows
of a 150k x 2048 fold without loading the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def oof(self) -> Path:
        return self.root / "oof.parquet"

    @property
    def test(self) -> Path:
        return self.root / "test.parquet"

    @property
    def curves_png(self) -> Path:
        return self.root / "curves.png"

    def curves_csv(self, fold: int) -> Path:
        return self.root / f"curves_fold{fold}.csv"

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold{fold}"

    def best(self, fold: int) -> Path:
        return self.fold_dir(fold) / "best.pt"

    def last(self, fold: int) -> Path:
        return self.fold_dir(fold) / "last.pt"

    def previous(self, fold: int) -> Path:
        return self.fold_dir(fold) / "last.prev.pt"

    def fold_oof(self, fold: int) -> Path:
        return self.fold_dir(fold) / "oof.parquet"

    def fold_test(self, fold: int) -> Path:
        return self.fold_dir(fold) / "test.parquet"

    def embeddings(self, fold: int, split: str) -> Path:
        """``split``: "oof" or "test"."""
        return self.fold_dir(fold) / f"embeddings_{split}.npy"

    def fold_done(self, fold: int) -> Path:
        return self.fold_dir(fold) / "done.json"
