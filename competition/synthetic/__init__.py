"""A synthetic, labelled RSNA Intracranial Hemorrhage competition in the exact Kaggle layout.

No machine here reaches Kaggle; this writes a small competition whose images are slices of 3-D
head phantoms (skin, skull, grey and white matter, sulci, fissures, cisterns, ventricles, skull
base, scanner noise, per-patient size, position and tilt) with 3-D bleeds of the five subtypes,
each told apart by place and shape (see `bleeds`). Every pipeline stage has real work to do:
windowing matters (blood is 50-90 HU beside bone at 1000+), neighbouring slices matter (bleeds
span contiguous slices and fade at their ends), and so do the study and the patient (follow-up
studies show the same bleeds).

Usage::

    python -m competition.synthetic generate --out data/synthetic [--preset demo|tiny] [--patients N]
                                             [--size 256] [--seed 0] [--workers 2]
    python -m competition.synthetic score SUBMISSION.csv[.gz] data/synthetic/stage_2_test_answers.csv
    python -m competition.synthetic sheet data/synthetic --out /tmp/sheet.png

What a dataset folder holds
---------------------------
- ``stage_2_train/``, ``stage_2_test/``: one DICOM per slice named ``<SOPInstanceUID>.dcm``
  (``ID_`` + 9 hex; patients ``ID_`` + 8 hex; studies and series ``ID_`` + 10 hex), with the real
  files' header fields (see `dicom_writer`). Some series carry the 12-bit intercept quirk, some
  have an image size other than the chosen one, and exactly one train file has truncated pixel
  data (its labels are still in the CSV, as ID_6431af929's are in the real data).
- ``stage_2_train.csv``: long format ``ID,Label`` (``ID_<image>_<label>``), six rows per image in
  LABELS order, images in no order, a few images listed twice (exact duplicates).
- ``stage_2_sample_submission.csv``: every test image x six labels, Label 0.5.
- ``stage_2_test_answers.csv``: the test labels, long format; only the scorer reads it.
- ``SYNTHETIC_OK``: the configuration as JSON, written last (the dataset is complete).
- ``synthetic_truth/`` (the ground truth behind the labels, outside the image folders):
  - ``series.csv``: one row per series: series_id, study_id, patient_id, split, n_slices, rows,
    columns, pixel_spacing, slice_spacing, tilt_deg, intercept_quirk (0/1),
    truncated_image_id (empty but for one series), subtypes (``;``-joined).
  - ``bleeds.csv``: one row per bleed object: series_id, subtype, variant (lens, crescent, basal,
    convexity, deep, lobar, cerebellar, layering, cast), centre_x/y/z (head coordinates, mm),
    extent_mm (bounding radius), hu.
  - ``<series_id>.npz`` for each series with a bleed: ``masks`` uint8 (n, rows, columns), bit i
    set where ``SUBTYPES[i]`` fills at least 20% of the pixel's volume (same pixel grid as the
    DICOM), and ``image_ids`` (n,) naming the slice of each mask.
  - ``index.csv``: one row per slice of each series with a bleed: image_id, split, patient_id,
    study_id, series_id, slice_index (0 = lowest z), file (the npz), row (index into its masks,
    -1 when the slice has no bleed pixel), area_mm2_<subtype> (blood area, occupancy-weighted),
    and the six labels. A slice is positive for a subtype when that area is >= min_area_mm2.
"""
from __future__ import annotations

from typing import Any

from competition.synthetic.dataset import ANSWERS, MARKER, TRUTH_DIR, generate, resolve_config
from competition.synthetic.plan import PRESETS, Knobs

# Loaded on first use: rendering workers import this package and need neither pandas nor matplotlib.
# (Module names differ from the function names so that importing a module never shadows its function.)
_LAZY = {"contact_sheet": "competition.synthetic.sheet", "score_submission": "competition.synthetic.scoring"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'competition.synthetic' has no attribute {name!r}")


__all__ = [
    "ANSWERS", "MARKER", "PRESETS", "TRUTH_DIR", "Knobs", "contact_sheet", "generate", "resolve_config",
    "score_submission",
]
