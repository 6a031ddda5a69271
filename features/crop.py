"""Where the head is: one square box per series, cut out of each slice before the cache resizes it.

A CT slice is mostly air around the head (the 2019 top solutions cropped it away), and it need not
be square. The cache keeps, per slice, the square ``box = (y0, x0, y1, x1)`` (end-exclusive, in the
slice's own pixel coordinates) that it resized to ``size`` x ``size``: the head plus a margin,
widened to a square about its centre. A box may reach past the slice's edges; that part is filled
with air, so a non-square slice is padded, never stretched.

One box serves a whole series (the union of the head's extent over its slices of one shape): the
neighbouring slices a 2.5D input stacks as channels then share one pixel grid, as they do in the
scanner. A per-slice box would shift and scale each neighbour differently.

:func:`to_original` maps a map made on the cached image (a heatmap, a mask) back onto the slice.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import cv2
import numpy as np

BODY_HU = -500.0  # above: skin, fat, tissue, bone; below: air, and the scanner's padding
MARGIN = 0.02  # added around the head on each side, as a share of the slice's larger side
MIN_SIDE = 0.5  # the box side is at least this share of the slice's larger side: zoom is at most 2x

Extent = tuple[int, int, int, int]  # y0, x0, y1, x1 (end-exclusive)


def head_extent(hu: np.ndarray) -> Extent | None:
    """Bounding box of the largest connected region above BODY_HU (the head, not the table or a
    stray pixel); None for a slice of air. Found on every s-th pixel (s = side // 128, so a 512 px
    slice costs a tenth of a millisecond), the box widened by s - 1 so that it still holds the region."""
    s = max(1, max(hu.shape) // 128)
    mask = (hu[::s, ::s] > BODY_HU).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) * s for v in stats[k, :4])
    return max(y - s + 1, 0), max(x - s + 1, 0), min(y + h, hu.shape[0]), min(x + w, hu.shape[1])


def union(extents: Iterable[Extent | None]) -> Extent | None:
    found = [e for e in extents if e is not None]
    if not found:
        return None
    return min(e[0] for e in found), min(e[1] for e in found), max(e[2] for e in found), max(e[3] for e in found)


def square_box(extent: Extent | None, shape: tuple[int, int]) -> np.ndarray:
    """The square (y0, x0, y1, x1) the cache cuts from slices of ``shape``: ``extent`` plus MARGIN,
    kept inside the slice, widened to a square (at least MIN_SIDE) about its centre. ``extent``
    None keeps the whole slice (padded to a square)."""
    rows, cols = shape
    if extent is None:
        y0, x0, y1, x1 = 0, 0, rows, cols
        side = max(rows, cols)
    else:
        m = round(MARGIN * max(rows, cols))
        y0, x0 = max(extent[0] - m, 0), max(extent[1] - m, 0)
        y1, x1 = min(extent[2] + m, rows), min(extent[3] + m, cols)
        side = max(y1 - y0, x1 - x0, math.ceil(MIN_SIDE * max(rows, cols)))
    top, left = (y0 + y1 - side) // 2, (x0 + x1 - side) // 2
    return np.array([top, left, top + side, left + side], dtype=np.int32)


def cut_square(hu: np.ndarray, box: np.ndarray, fill: float) -> np.ndarray:
    """The box's pixels of ``hu`` (float32, side x side); ``fill`` where the box is off the slice."""
    y0, x0, y1, x1 = (int(v) for v in box)
    rows, cols = hu.shape
    if (y0, x0, y1, x1) == (0, 0, rows, cols):
        return hu
    out = np.full((y1 - y0, x1 - x0), fill, dtype=np.float32)
    a0, b0, a1, b1 = max(y0, 0), max(x0, 0), min(y1, rows), min(x1, cols)
    if a1 > a0 and b1 > b0:
        out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = hu[a0:a1, b0:b1]
    return out


def to_original(image: np.ndarray, box: np.ndarray, shape: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """A square map made on the cached image (at any square size: the cache's, the model's input,
    a Grad-CAM map at feature resolution), put back on the slice's own pixel grid (rows x cols
    float32): resized (bilinear) to the box's side and placed at the box; ``fill`` outside it."""
    y0, x0, y1, x1 = (int(v) for v in box)
    side = y1 - y0
    square = cv2.resize(np.asarray(image, dtype=np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return cut_square(square, np.array([-y0, -x0, shape[0] - y0, shape[1] - x0]), fill)
