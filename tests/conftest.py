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
