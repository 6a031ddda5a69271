"""Slices no header places (no ImagePositionPatient, SliceLocation or InstanceNumber), placed by
their pixels: neighbouring slices of a head CT look alike, so each is inserted where it adds the
least to the series' path of slice-to-slice differences (cheapest insertion), one after another.

Only ``make predict`` has the pixels at hand when it orders a series; the metadata pass reads
headers only, so there such slices stay after the placed ones (the competition's slices all have
positions). Each slice placed this way is named in a warning with its new neighbours.
"""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from competition.slice_order import NO_EVIDENCE

THUMB = 32  # px: enough to tell neighbouring 5 mm slices apart, cheap for hundreds of slices


def thumbnail(hu: np.ndarray) -> np.ndarray:
    """The slice at THUMB px, soft-tissue range, zero mean and unit norm (for a correlation)."""
    small = cv2.resize(np.clip(hu.astype(np.float32), -200, 300), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm else small


def _cost(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b)  # 1 - correlation


def insert_by_similarity(order: list[str], unplaced: list[str], thumbs: dict[str, np.ndarray]) -> list[str]:
    """``order`` with each of ``unplaced`` inserted at its cheapest place, in turn."""
    order = list(order)
    for u in unplaced:
        t = thumbs[u]
        costs = [_cost(t, thumbs[order[0]])] if order else [0.0]
        costs += [_cost(thumbs[a], t) + _cost(t, thumbs[b]) - _cost(thumbs[a], thumbs[b]) for a, b in zip(order, order[1:])]
        costs += [_cost(thumbs[order[-1]], t)] if order else []
        order.insert(int(np.argmin(costs)), u)
    return order


def place_unplaced(table: pd.DataFrame, hu: dict[str, np.ndarray], notes: list[tuple[str, str]]) -> pd.DataFrame:
    """Reorder each series' readable slices that the headers left unplaced (their rows in ``notes``
    say so), rewriting ``slice_index`` and those notes."""
    unplaced_paths = {p for p, n in notes if n.endswith(NO_EVIDENCE)}
    lost = table["path"].isin(unplaced_paths) & table["image_id"].isin(hu.keys())
    if not lost.any():
        return table
    table = table.copy()
    for series_id in table.loc[lost, "series_id"].unique():
        rows = table[table["series_id"] == series_id].sort_values("slice_index")
        moving = rows.loc[lost[rows.index], "image_id"].tolist()
        placed = [i for i in rows["image_id"] if i not in moving and i in hu]
        if len(placed) < 2:
            continue
        thumbs = {i: thumbnail(hu[i]) for i in placed + moving}
        order = insert_by_similarity(placed, moving, thumbs)
        rest = [i for i in rows["image_id"] if i not in order]  # unreadable slices with no place either
        index = {image_id: k for k, image_id in enumerate(order + rest)}
        table.loc[rows.index, "slice_index"] = rows["image_id"].map(index).astype(np.int32)
        path_of = dict(zip(rows["image_id"], rows["path"]))
        for image_id in moving:
            k = order.index(image_id)
            around = " and ".join(path_of[i] for i in order[max(k - 1, 0):k + 2] if i != image_id)
            note = (f"no ImagePositionPatient, SliceLocation or InstanceNumber: placed in series {series_id} next to "
                    f"{around} by image similarity (its pixels fit best there)")
            notes[:] = [(p, note if p == path_of[image_id] and n.endswith(NO_EVIDENCE) else n) for p, n in notes]
    return table
