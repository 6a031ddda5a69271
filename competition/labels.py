"""Labels: the competition's long CSV (``ID_<image>_<subtype>,Label``) <-> one row per image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS


class LabelError(ValueError):
    """The label file breaks the competition's format; the message names the ids."""


def _preview(ids: pd.Series | list, n: int = 5) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:n])) + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


def split_long_ids(ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``ID_<image>_<subtype>`` -> (``ID_<image>``, subtype)."""
    parts = ids.astype(str).str.rsplit("_", n=1)
    bad = parts.str.len() != 2
    if bad.any():
        raise LabelError(f"ids not of the form ID_<image>_<subtype>: {_preview(ids[bad])}")
    return parts.str[0], parts.str[1]


def long_to_wide(long: pd.DataFrame, source: str = "labels") -> pd.DataFrame:
    """Long table (ID, Label) -> one row per image with the six labels (int8), sorted by image_id.

    Exact duplicate rows (the real file has them) are dropped; conflicting duplicates, unknown
    or missing subtypes and labels other than 0/1 are errors naming the ids.
    """
    missing = {"ID", "Label"} - set(long.columns)
    if missing:
        raise LabelError(f"{source}: missing column(s) {sorted(missing)}; expected the Kaggle header `ID,Label`")
    long = long[["ID", "Label"]].drop_duplicates()
    conflicts = long["ID"][long["ID"].duplicated(keep=False)].unique()
    if len(conflicts):
        raise LabelError(f"{source}: conflicting labels for {_preview(conflicts)}")
    label_values = pd.to_numeric(long["Label"], errors="coerce")
    bad_values = ~label_values.isin([0, 1])
    if bad_values.any():
        raise LabelError(f"{source}: labels other than 0/1 for {_preview(long['ID'][bad_values])}")
    image_id, subtype = split_long_ids(long["ID"])
    unknown = ~subtype.isin(LABELS)
    if unknown.any():
        raise LabelError(f"{source}: unknown subtype in {_preview(long['ID'][unknown])}; known: {', '.join(LABELS)}")
    wide = (
        pd.DataFrame({"image_id": image_id.values, "subtype": subtype.values, "label": label_values.values})
        .pivot(index="image_id", columns="subtype", values="label")
        .reindex(columns=list(LABELS))
    )
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        raise LabelError(f"{source}: images missing some of the six subtypes: {_preview(wide.index[incomplete])}")
    wide = wide.astype(np.int8).sort_index().reset_index()
    wide.columns.name = None
    return wide


def read_labels(csv_path: Path | str) -> pd.DataFrame:
    """Read a long-format label CSV (train labels, or a synthetic answers file)."""
    path = Path(csv_path)
    if not path.is_file():
        raise LabelError(f"label file {path} not found; is DATA the Kaggle competition folder?")
    try:
        long = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise LabelError(f"label file {path} is empty (not even the `ID,Label` header); "
                         f"download it again (`make data`) or regenerate the dataset") from None
    if long.empty:
        raise LabelError(f"label file {path} has a header but no rows; download it again (`make data`) "
                         f"or regenerate the dataset")
    return long_to_wide(long, source=str(path))


def labels_to_long(wide: pd.DataFrame, value_columns: tuple[str, ...] = LABELS) -> pd.DataFrame:
    """One row per image -> the Kaggle long format (``ID``, ``Label``), image-major, LABELS order."""
    values = wide[list(value_columns)].to_numpy()
    ids = wide["image_id"].astype(str).to_numpy()
    return pd.DataFrame(
        {
            "ID": np.char.add(np.repeat(ids, len(value_columns)).astype(str), np.tile([f"_{c}" for c in value_columns], len(ids))),
            "Label": values.reshape(-1),
        }
    )
