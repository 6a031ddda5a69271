"""Slice order within a series, shared by the metadata pass (``make prepare``) and ``make predict``.

The rule: slices with ImagePositionPatient are ordered by its z. A slice without it is placed by
the next evidence it has, SliceLocation then InstanceNumber, mapped onto z by a straight line
fitted on the series' slices that have both (so InstanceNumber may run either way along z). In a
series where no slice has a position, the first evidence present becomes the axis. Slices with no
evidence at all go after the placed ones. Ties, and those last slices, are ordered by image id
(the file stem in the competition, SOPInstanceUID in predict). ``z`` itself stays NaN where the
header has no position: it is not invented. Each slice not placed by its own z gets a note.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

EVIDENCE = {"slice_location": "SliceLocation", "instance_number": "InstanceNumber"}
NO_EVIDENCE = "nothing: no ImagePositionPatient, SliceLocation or InstanceNumber; put after the placed slices, by image id"
POSITION_DECIMALS = 2  # z values equal to 0.01 mm are the same position


def _fit(x: pd.Series, y: pd.Series) -> tuple[float, float] | None:
    """(a, b) of y = a + b x over the rows that have both; None without two distinct x or with b = 0."""
    both = x.notna() & y.notna()
    if x[both].nunique() < 2:
        return None
    b, a = np.polyfit(x[both].to_numpy(float), y[both].to_numpy(float), 1)
    return (float(a), float(b)) if b else None


def _series_key(group: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The sort key of one series lacking some z, and per row how it was placed."""
    key = group["z"].astype(float).copy()
    how = pd.Series(np.where(key.notna(), "z", ""), index=group.index, dtype=object)
    for column, tag in EVIDENCE.items():
        if column not in group:
            continue
        evidence = group[column].astype(float)
        need = key.isna() & evidence.notna()
        if not need.any():
            continue
        if key.notna().any():
            line = _fit(evidence, key)
            if line is None:
                continue
            key[need] = line[0] + line[1] * evidence[need]
            how[need] = f"{tag} (fitted to z on {int((evidence.notna() & key.notna() & ~need).sum())} slices that have both)"
        else:  # no reference yet: this evidence is the axis
            key[need] = evidence[need]
            how[need] = f"{tag} (no slice of the series has ImagePositionPatient)"
    unplaced = key.isna()
    key[unplaced] = np.inf
    how[unplaced] = NO_EVIDENCE
    return key, how


def slice_order_key(table: pd.DataFrame) -> tuple[np.ndarray, pd.Series]:
    """Per row, the value its series is sorted by, and how the row was placed ("z" for most)."""
    key = table["z"].astype(float).copy()
    how = pd.Series("z", index=table.index, dtype=object)
    lacking = table.loc[table["z"].isna(), "series_id"].unique()
    for _, group in table[table["series_id"].isin(lacking)].groupby("series_id", sort=False):
        key[group.index], how[group.index] = _series_key(group)
    return key.to_numpy(), how


def add_slice_order(table: pd.DataFrame, notes: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """slice_index (by :func:`slice_order_key` within the series, ties broken by image_id) and
    n_slices; appends (path, note) to ``notes`` for each slice not placed by its own z."""
    key, how = slice_order_key(table)
    if notes is not None:
        for i in how.index[how != "z"]:
            notes.append((table.at[i, "path"], f"no ImagePositionPatient: placed in series {table.at[i, 'series_id']} by {how[i]}"))
    table = table.assign(_key=key)
    table = table.sort_values(["series_id", "_key", "image_id"], kind="mergesort").drop(columns="_key")
    table["slice_index"] = table.groupby("series_id", sort=False).cumcount().astype(np.int32)
    table["n_slices"] = table.groupby("series_id", sort=False)["image_id"].transform("size").astype(np.int32)
    return table.sort_values("image_id", ignore_index=True)


def duplicate_positions(table: pd.DataFrame) -> pd.DataFrame:
    """Rows at the same z as an earlier slice of their series (earlier: readable where the table
    says, then lower InstanceNumber, then image id), with ``kept_id``/``kept_path``: the slice they repeat."""
    located = table[table["z"].notna()].assign(_z=lambda t: t["z"].astype(float).round(POSITION_DECIMALS),
                                               _unreadable=lambda t: ~t["readable"] if "readable" in t else False)
    located = located.sort_values(["series_id", "_z", "_unreadable", "instance_number", "image_id"], kind="mergesort",
                                  na_position="last")
    first = located.groupby(["series_id", "_z"], sort=False)[["image_id", "path"]].transform("first")
    repeats = located["image_id"] != first["image_id"]
    return located.loc[repeats].drop(columns=["_z", "_unreadable"]).assign(kept_id=first.loc[repeats, "image_id"],
                                                           kept_path=first.loc[repeats, "path"])
