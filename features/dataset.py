"""The torch Dataset the level-1 models train and predict on.

An item is one image: its window combination's channels (C x H x W float32 in [0, 1]) and its six
labels. The image shows the square the cache cut from the slice (the head of its series, see
``features.crop``); :meth:`SliceDataset.box` gives it, to put a map made on the input (Grad-CAM)
back onto the original slice with ``features.crop.to_original``. 2.5D combinations read the neighbouring slices of the same series in z order (the
metadata's ``slice_index``); at the ends of a series the edge slice repeats itself. Each distinct
slice is read from the cache once per item, however many windows use it.

Images not in the cache (listed as bad by the cache pass) are served as air (every HU -1024) and
counted, with one warning when the dataset is built: out-of-fold and test predictions must still
cover every image, so dropping them silently would break the join. Callers that want them out of
training can filter with :func:`cached_only`. A bad *neighbour* is replaced by the current slice.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from competition.constants import LABELS
from features.augment import AugmentConfig, Augmenter
from features.cache import HU_MIN, ImageCache, resize_hu
from features.windows import FALLBACK_HEADER_WINDOW, Combination, apply_combination, get_combination

MISSING = -1  # cache row of an image that is not cached


def neighbour_ids(metadata: pd.DataFrame, image_ids: Sequence[str], offsets: Sequence[int]) -> np.ndarray:
    """N x K image ids: for each image, the slice ``offset`` positions away in its series' z order,
    clamped to the series' ends (the edge slice stands in for the missing neighbour)."""
    needed = {"image_id", "series_id", "slice_index", "n_slices"}
    if missing := needed - set(metadata.columns):
        raise ValueError(f"metadata lacks columns {sorted(missing)}; build it with `python -m competition metadata`")
    meta = metadata.set_index("image_id")[["series_id", "slice_index", "n_slices"]]
    ids = pd.Index(image_ids)
    absent = ids.difference(meta.index)
    if len(absent):
        raise ValueError(f"{len(absent)} image ids are not in the metadata (first: {absent[0]}); rebuild the metadata")
    rows = meta.loc[ids]
    by_position = pd.Series(
        metadata["image_id"].to_numpy(),
        index=pd.MultiIndex.from_arrays([metadata["series_id"], metadata["slice_index"].astype(np.int64)]),
    )
    index = rows["slice_index"].to_numpy(np.int64)
    last = rows["n_slices"].to_numpy(np.int64) - 1
    out = np.empty((len(ids), len(offsets)), dtype=object)
    for k, offset in enumerate(offsets):
        target = np.clip(index + offset, 0, last)
        found = by_position.reindex(pd.MultiIndex.from_arrays([rows["series_id"], target])).to_numpy()
        # A gap in slice_index (should not happen) falls back to the image itself.
        out[:, k] = np.where(pd.isna(found), ids.to_numpy(), found)
    return out


def cached_only(image_ids: Sequence[str], cache: ImageCache) -> list[str]:
    """The ids that the cache can serve (drops the ones listed as bad)."""
    return [i for i in image_ids if i in cache]


class SliceDataset(Dataset):
    """``ds[i]`` -> (C x size x size float32 tensor in [0, 1], float32 tensor of the six LABELS).

    ``image_ids`` fixes the order; ``metadata`` gives each image's series and z order (and header
    windows); ``labels`` (image_id + LABELS columns) may be None for test images (zeros are
    returned). ``augment`` turns the training augmentations on; leave it off for validation, OOF
    and test prediction. ``augment_config`` says which and how strongly (the model spec's ``aug``;
    see ``features.augment``); its ``channel_swap`` reverses the K slices (in ``combination.offsets``
    order, with their header windows) before windowing, which for the symmetric stacks here
    (offsets -1, 0, +1) swaps the previous and next slice. A cache of another size than ``size`` is
    resized on the fly.
    """

    def __init__(
        self,
        image_ids: Sequence[str],
        metadata: pd.DataFrame,
        cache: ImageCache,
        combination: str | Combination,
        size: int,
        labels: pd.DataFrame | None = None,
        augment: bool = False,
        augment_config: AugmentConfig = AugmentConfig(),
        as_uint8: bool = False,
    ):
        self.image_ids = list(image_ids)
        self.as_uint8 = as_uint8
        self.cache = cache
        self.combination = get_combination(combination) if isinstance(combination, str) else combination
        self.size = int(size)
        self.augment = augment
        self.augment_config = augment_config
        offsets = self.combination.offsets
        n = len(self.image_ids)

        neighbours = neighbour_ids(metadata, self.image_ids, offsets) if n else np.empty((0, len(offsets)), object)
        rows = cache.rows_of(neighbours.ravel()).reshape(neighbours.shape)
        own = cache.rows_of(self.image_ids)
        self.n_uncached = int((own == MISSING).sum())
        # A bad neighbour is replaced by the image itself (as at the series' ends); a bad image is
        # served as air whatever its neighbours.
        fallback = (rows == MISSING) & (own[:, None] != MISSING)
        self.n_neighbour_fallbacks = int(fallback.sum())
        rows = np.where(fallback, own[:, None], rows)
        rows[own == MISSING] = MISSING
        neighbours = np.where(fallback, np.asarray(self.image_ids, dtype=object)[:, None], neighbours)
        self._rows = rows
        if self.n_uncached:
            first = next(i for i, r in zip(self.image_ids, own) if r == MISSING)
            warnings.warn(
                f"{self.n_uncached} of {n} images are not in the cache (bad files, or not cached yet; first: {first}); "
                f"they are served as air (all -1024 HU)",
                stacklevel=2,
            )

        self._header = None
        if self.combination.uses_header:
            meta = metadata.set_index("image_id")[["window_center", "window_width"]]
            windows = np.array(meta.reindex(neighbours.ravel()), dtype=np.float64)
            # As usable_header_window, vectorised: missing or degenerate headers get the fallback.
            usable = np.isfinite(windows).all(axis=1) & (windows[:, 1] > 0)
            windows[~usable] = FALLBACK_HEADER_WINDOW
            self._header = windows.astype(np.float32).reshape(n, len(offsets), 2)

        if labels is None:
            self._labels = np.zeros((n, len(LABELS)), dtype=np.float32)
        else:
            table = labels.set_index("image_id")
            absent = pd.Index(self.image_ids).difference(table.index)
            if len(absent):
                raise ValueError(f"{len(absent)} images have no labels (first: {absent[0]}); pass labels=None for test images")
            self._labels = np.array(table.loc[self.image_ids, list(LABELS)], dtype=np.float32)

        self._augmenter: Augmenter | None = None
        self._augmenter_pid: int | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def _get_augmenter(self) -> Augmenter:
        # Built lazily in each process: forked DataLoader workers must not share one random state.
        if self._augmenter is None or self._augmenter_pid != os.getpid():
            self._augmenter = Augmenter(self.size, self.augment_config, seed=torch.initial_seed() % 2**31)
            self._augmenter_pid = os.getpid()
        return self._augmenter

    def reseed(self, seed: int) -> None:
        """Reseed the augmentations in this process (a no-op without augmentation)."""
        if self.augment:
            self._get_augmenter().reseed(seed)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_augmenter"] = None
        return state

    def box(self, i: int) -> np.ndarray:
        """(y0, x0, y1, x1): the square of item ``i``'s slice that its input shows, in the slice's pixels."""
        return self.cache.box(self.image_ids[i])

    def read_slices(self, i: int) -> np.ndarray:
        """K x size x size float32 HU: one cache read per distinct slice of the combination."""
        rows = self._rows[i]
        if (rows == MISSING).any():
            hu = np.full((len(rows), self.cache.size, self.cache.size), HU_MIN, dtype=np.float32)
        elif len(rows) == 1:
            hu = self.cache.read_rows(rows, dtype=np.float32)
        else:
            # Duplicate rows (series ends) are read once.
            unique, inverse = np.unique(rows, return_inverse=True)
            hu = self.cache.read_rows(unique, dtype=np.float32)[inverse]
        if self.cache.size != self.size:
            hu = np.stack([resize_hu(s, self.size) for s in hu])
        return hu

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        hu = self.read_slices(i)
        header = self._header[i] if self._header is not None else None
        if self.augment:
            aug = self._get_augmenter()
            if aug.swap_slices(len(hu)):  # channel_swap: the stack flipped in z, each slice with its own header
                hu = hu[::-1]
                header = None if header is None else header[::-1]
            if len(hu) == 1:  # one slice: warp it as a plain H x W image
                hu = aug.geometric(hu[0])[None]
            else:
                # K x H x W <-> H x W x K: cv2.merge is ~10x faster than numpy's transposing copy,
                # and windowing reads contiguous slices several times faster than strided ones.
                hu = np.ascontiguousarray(aug.geometric(cv2.merge(list(hu))).transpose(2, 0, 1))
            image = aug.photometric(apply_combination(self.combination, hu, header))
        else:
            image = apply_combination(self.combination, hu, header)
        if self.as_uint8:
            image = to_uint8(image)
        return torch.from_numpy(image), torch.from_numpy(self._labels[i].copy())  # a copy: callers may edit it


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float32 channels -> uint8 (x 255, rounded). A quarter of the bytes through the worker's
    shared memory, the pinned-memory copy and the PCIe link, where float32 capped the loader on a
    GPU machine; 1/255 steps are finer than any window's contrast. ``unit_float`` undoes it."""
    flat = image.reshape(-1, image.shape[-1])  # cv2 takes 2-D: one pass, saturating and rounding
    return cv2.convertScaleAbs(flat, alpha=255.0).reshape(image.shape)


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """A batch as the model takes it: float in [0, 1] (uint8 batches are scaled on the device)."""
    return x.float().mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x
