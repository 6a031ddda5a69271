"""Write test predictions (one row per image) as the Kaggle long format, in the sample's id order.

Every id of the sample submission gets its probability (``ID_<image>_<subtype>``, subtype one of
the six LABELS), clipped into [clip, 1 - clip]: one confident miss at 1e-15 would cost ~35 nats.
The written file is read back and validated before its path is returned.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.labels import LabelError, split_long_ids
from competition.layout import Layout
from competition.paths import WorkPaths
from submissions.provenance import record_written
from submissions.validate import SubmissionError, read_sample_ids, validate_submission

DEFAULT_CLIP = 1e-5
DEFAULT_OUT_DIR = Path(__file__).resolve().parent  # submissions/ (written files are git-ignored)
STACK_SOURCE = "stack"
TEST_FILE = "test.parquet"


def submission_path(data_dir: Path | str, source: str, out_dir: Path | str = DEFAULT_OUT_DIR) -> Path:
    """``<out_dir>/<basename of DATA>-<source>.csv.gz``."""
    return Path(out_dir) / f"{Path(data_dir).resolve().name}-{source}.csv.gz"


def source_predictions(paths: WorkPaths, model: str | None = None) -> pd.DataFrame:
    """Test predictions of one level-1 model (``model``) or of the stacker (``model=None``)."""
    path = (paths.model_dir(model) if model else paths.stack) / TEST_FILE
    if not path.is_file():
        how = f"`make oof MODEL={model}`" if model else "`make stack`"
        raise SubmissionError(f"{path} not found; run {how} first")
    return pd.read_parquet(path)


def to_long(test: pd.DataFrame, sample_ids: pd.Index, clip: float = DEFAULT_CLIP) -> pd.DataFrame:
    """The sample submission's ids, in its order, with the predicted probabilities."""
    if not 0 <= clip < 0.5:
        raise SubmissionError(f"clip must lie in [0, 0.5), got {clip}")
    lacking = [c for c in ("image_id", *LABELS) if c not in test.columns]
    if lacking:
        raise SubmissionError(f"test predictions lack column(s) {lacking}")
    have = pd.Index(test["image_id"])
    if have.has_duplicates:
        raise SubmissionError(f"test predictions repeat image {have[have.duplicated()][0]}")
    try:
        image, subtype = split_long_ids(pd.Series(sample_ids))
    except LabelError as exc:
        raise SubmissionError(f"sample submission: {exc}") from exc
    label_col = pd.Index(LABELS).get_indexer(subtype)
    if (label_col < 0).any():
        raise SubmissionError(f"sample submission: unknown subtype in {sample_ids[label_col < 0][0]}")
    row = have.get_indexer(image)
    if (row < 0).any():
        raise SubmissionError(
            f"test predictions lack {len(set(image[row < 0]))} image(s) of the sample submission, e.g. {image[row < 0].iloc[0]}"
        )
    needed = pd.Index(image.unique())
    extra = have.difference(needed)
    if len(extra):
        raise SubmissionError(f"test predictions hold {len(extra)} image(s) not in the sample submission, e.g. {extra[0]}")
    probs = test[list(LABELS)].to_numpy(dtype=np.float64)
    values = probs[row, label_col]
    if not np.isfinite(values).all():
        raise SubmissionError(f"test predictions are NaN for {sample_ids[~np.isfinite(values)][0]}")
    return pd.DataFrame({"ID": sample_ids.to_numpy(), "Label": np.clip(values, clip, 1 - clip)})


def write_submission(test: pd.DataFrame, sample_submission: Path | str, out_path: Path | str, clip: float = DEFAULT_CLIP) -> Path:
    """Write, validate and return ``out_path`` (gzip when it ends in .gz); atomic: no half file is left."""
    sample_ids = read_sample_ids(sample_submission)
    table = to_long(test, sample_ids, clip)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name ending like the real one (pandas picks gzip from ".gz"),
    # validated, then renamed: a file that fails validation never takes the real name.
    tmp = out_path.with_name(f".part-{out_path.name}")
    try:
        table.to_csv(tmp, index=False, float_format="%.6g")
        validate_submission(tmp, sample_submission)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def write_from_work(data_dir: Path | str, work_dir: Path | str | None = None, model: str | None = None,
                    out_dir: Path | str = DEFAULT_OUT_DIR, clip: float = DEFAULT_CLIP) -> Path:
    """The submission of one level-1 model (``model``) or of the stacker (``model=None``)."""
    layout = Layout.find(data_dir)
    layout.require("sample_submission")
    paths = WorkPaths.for_data(data_dir, work_dir)
    test = source_predictions(paths, model)
    path = write_submission(test, layout.sample_submission, submission_path(data_dir, model or STACK_SOURCE, out_dir), clip)
    record_written(paths, path, model)  # what `make submit` logs beside the file's scores
    return path
