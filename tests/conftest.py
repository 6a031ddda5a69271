"""Shared test fixtures. Tests are CPU-only, offline, and write only under tmp_path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only add overhead
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let a test reach for weights on the network

REPO = Path(__file__).resolve().parents[1]
# One real RSNA series lives beside the checkout in this workplace; a user's clone has none.
REAL_SAMPLE = REPO.parent / "shared" / "rsna_sample"


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not (REAL_SAMPLE / "stage_2_test").is_dir():
        pytest.skip("../shared/rsna_sample (one real RSNA series) is not present")
    return REAL_SAMPLE


def prepare_tiny_competition(root: Path, n_folds: int = 2, cache_size: int = 64, damage=None):
    """The tiny synthetic competition under ``root``, prepared like `make prepare` (metadata,
    labels, ``n_folds`` folds, the image cache). Returns (DATA, WorkPaths)."""
    return prepare_competition(root / "tiny", root / "work", n_folds, cache_size, damage, preset="tiny", seed=0)


def prepare_competition(data_dir: Path, work_dir: Path, n_folds: int = 2, cache_size: int = 64, damage=None,
                        **generate_kw):
    """A synthetic competition (``competition.synthetic.generate``'s keywords: preset, seed,
    n_patients, size, knobs) written to ``data_dir`` and prepared into ``work_dir`` like `make
    prepare`; ``damage(DATA)``, when given, runs between the two. Returns (DATA, WorkPaths)."""
    from competition.folds import make_folds
    from competition.labels import read_labels
    from competition.layout import Layout
    from competition.metadata import build_metadata
    from competition.paths import WorkPaths
    from competition.synthetic import generate
    from features.cache import build_cache

    data = generate(data_dir, workers=1, progress=False, **generate_kw)
    if damage is not None:
        damage(data)
    paths = WorkPaths.for_data(data, work_dir).ensure()
    metadata = build_metadata(data, paths.metadata, workers=1, progress=False)
    labels = read_labels(Layout.find(data).train_csv)
    labels.to_parquet(paths.labels, index=False)
    make_folds(metadata, labels, n_folds=n_folds, seed=42).to_parquet(paths.folds, index=False)
    build_cache(data, metadata, paths.cache, size=cache_size, workers=1, progress=False)
    return data, paths
