"""The image cache's preprocessing for one study, in memory: what ``features.cache.build_cache``
would store for these slices, served through the read interface ``features.dataset.SliceDataset``
uses, so a level-1 model sees exactly what its test images looked like.

Per series one square box (``features.cache.series_boxes``: the head of every readable slice of one
shape, or the whole slice when the training cache was built without the crop), each slice cut,
resized to the cache size the model was trained from and rounded to int16
(``features.cache.to_stored``). The cache's codec is lossless, so it is skipped here.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from features.cache import DTYPE, series_boxes, to_stored

MISSING = -1


class MemoryCache:
    """``features.cache.ImageCache``'s read side over the slices of one study at one size."""

    def __init__(self, metadata: pd.DataFrame, hu: dict[str, np.ndarray], size: int, crop: bool = True):
        self.size = int(size)
        self.ids: list[str] = []
        boxes, stored = [], []
        readable = metadata[metadata["image_id"].isin(hu.keys())]
        for _, series in readable.groupby("series_id", sort=False):
            ids = series["image_id"].tolist()
            shape_box = series_boxes((hu[i] for i in ids), crop)
            for i in ids:
                box = shape_box[hu[i].shape]
                self.ids.append(i)
                boxes.append(np.asarray(box, dtype=np.int32))
                stored.append(to_stored(hu[i], self.size, box))
        self._slices = np.stack(stored) if stored else np.empty((0, self.size, self.size), DTYPE)
        self._boxes = np.stack(boxes) if boxes else np.empty((0, 4), np.int32)
        self._index = pd.Index(self.ids)
        self.reads = 0

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, image_id: str) -> int:
        if image_id not in self._index:
            raise KeyError(f"slice {image_id} was not readable")
        return int(self._index.get_loc(image_id))

    def rows_of(self, image_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        return self._index.get_indexer(pd.Index(np.asarray(image_ids, dtype=object))).astype(np.int64)

    def read_rows(self, rows: Sequence[int] | np.ndarray, dtype: np.dtype | type = DTYPE) -> np.ndarray:
        rows = np.asarray(rows)
        self.reads += len(rows)
        return self._slices[rows].astype(dtype)

    def read_hu(self, image_id: str) -> np.ndarray:
        return self._slices[self.row(image_id)].copy()

    def box(self, image_id: str) -> np.ndarray:
        return self._boxes[self.row(image_id)].copy()

    def boxes_of(self, image_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        rows = self.rows_of(image_ids)
        out = self._boxes[np.maximum(rows, 0)].copy()
        out[rows < 0] = MISSING
        return out
