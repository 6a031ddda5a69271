"""What a level-1 run reads: the shared folds and labels, the test ids, and the image datasets.

The training loop sees data only through ``RunInputs``: the folds table, the labels, the test ids
(exactly the sample submission's images, in its order) and a ``DatasetFactory`` that turns a list
of image ids into a torch Dataset of (C x H x W image, six labels). The real factory reads the
image cache through ``features.dataset.SliceDataset``; tests can pass a small synthetic one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from competition.constants import LABELS
from competition.labels import split_long_ids
from competition.layout import Layout
from competition.paths import WorkPaths
from level1_models.caches import cache_size_for, larger_cache_note
from features.augment_config import AugmentConfig


class CacheTooSmallError(FileNotFoundError):
    """The image cache is smaller than the model's input."""


class DatasetFactory(Protocol):
    """Builds the Dataset of some images; ``labeled`` images carry their six labels."""

    def __call__(self, image_ids: Sequence[str], labeled: bool, augment: bool) -> Dataset: ...


@dataclass
class RunInputs:
    folds: pd.DataFrame  # image_id, fold (every labelled train image once)
    labels: pd.DataFrame  # image_id + LABELS
    test_ids: list[str]  # the sample submission's images, in its order
    datasets: DatasetFactory
    trainable: set[str] | None = None  # train and test ids whose image is readable (None: all)

    def __post_init__(self) -> None:
        if self.folds["image_id"].duplicated().any():
            raise ValueError("the folds table lists an image twice; rebuild it with `python -m competition folds --force`")
        missing = pd.Index(self.folds["image_id"]).difference(pd.Index(self.labels["image_id"]))
        if len(missing):
            raise ValueError(f"{len(missing)} images of the folds table have no labels (first: {missing[0]}); "
                             f"rebuild labels and folds with `python -m competition prepare`")
        if len(set(self.test_ids)) != len(self.test_ids):
            raise ValueError("the test ids repeat an image")

    @property
    def fold_numbers(self) -> list[int]:
        return sorted(int(f) for f in self.folds["fold"].unique())

    def label_array(self, image_ids: Sequence[str]) -> np.ndarray:
        table = self.labels.set_index("image_id")
        return table.loc[list(image_ids), list(LABELS)].to_numpy(np.float64)


def sample_submission_ids(path: Path | str) -> list[str]:
    """Image ids of a long-format sample submission, in the file's order (each once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample submission {path} not found; is DATA the Kaggle competition folder?")
    image_ids, _ = split_long_ids(pd.read_csv(path, usecols=["ID"])["ID"])
    return list(dict.fromkeys(image_ids.tolist()))


def _read_table(path: Path, what: str, data_dir: Path | str) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{what} table {path} not found; run `make prepare DATA={data_dir}` first")
    return pd.read_parquet(path)


def pick_cache_size(available: Sequence[int], img_size: int) -> int:
    """The cache a run of ``img_size`` px reads (``level1_models.caches.cache_size_for``)."""
    return cache_size_for(img_size, available)


class CacheDatasets:
    """The real DatasetFactory: ``features.dataset.SliceDataset`` over the image cache."""

    def __init__(self, metadata: pd.DataFrame, labels: pd.DataFrame, cache_dir: Path, combination: str, img_size: int,
                 as_uint8: bool = False, model: str = "this model", augment_config: AugmentConfig = AugmentConfig()):
        """``as_uint8``: images leave the workers as uint8 (training and prediction turn them back
        into [0, 1] floats on the device with ``features.dataset.unit_float``). ``note`` is the line
        a run prints when it reads a larger cache than its input (what that costs), else None.
        ``augment_config``: the model spec's augmentations (``cfg.aug``), for the datasets built with
        ``augment=True``."""
        from features.cache import ImageCache, available_sizes

        size = pick_cache_size(available_sizes(cache_dir), img_size)
        if size < img_size:
            # Upsampling would hand the model less detail than it was built for while costing its
            # full compute: build the cache it needs instead, or train at the cache's size.
            raise CacheTooSmallError(
                f"the largest image cache in {cache_dir} is {size} px but this model reads {img_size} px; "
                f"build a cache of at least that size (make cache DATA=<data> CACHE_SIZE={img_size}) or train "
                f"at the cache's size (IMG_SIZE={size})"
            )
        self.cache = ImageCache(cache_dir, size)
        self.note = larger_cache_note(model, img_size, size)
        self.metadata, self.labels = metadata, labels
        self.combination, self.img_size = combination, img_size
        self.as_uint8 = as_uint8
        self.augment_config = augment_config

    def __call__(self, image_ids: Sequence[str], labeled: bool, augment: bool) -> Dataset:
        from features.dataset import SliceDataset

        return SliceDataset(
            image_ids, self.metadata, self.cache, self.combination, self.img_size,
            labels=self.labels if labeled else None, augment=augment, augment_config=self.augment_config,
            as_uint8=self.as_uint8,
        )

    def cached(self, image_ids: Sequence[str]) -> set[str]:
        from features.dataset import cached_only

        return set(cached_only(image_ids, self.cache))


def load_inputs(data_dir: Path | str, paths: WorkPaths, combination: str, img_size: int,
                model: str = "this model", augment_config: AugmentConfig = AugmentConfig()) -> RunInputs:
    """The prepared tables of one dataset (``make prepare``) and its cache-backed datasets, whose
    training ones are augmented as ``augment_config`` says (pass the run's ``cfg.aug``); ``model``
    names the run in the line said when it reads a larger cache."""
    layout = Layout.find(data_dir)
    metadata = _read_table(paths.metadata, "metadata", data_dir)
    labels = _read_table(paths.labels, "labels", data_dir)
    folds = _read_table(paths.folds, "folds", data_dir)[["image_id", "fold"]]
    test_ids = sample_submission_ids(layout.sample_submission)
    test_meta = set(metadata.loc[metadata["split"] == "test", "image_id"])
    absent = [i for i in test_ids if i not in test_meta]
    if absent:
        raise ValueError(f"{len(absent)} sample-submission images have no readable DICOM in {layout.test_dir} "
                         f"(first: {absent[0]}; unreadable ones are listed in {paths.bad_files}): download the "
                         f"competition again (make data DATA={data_dir}, it resumes) or restore those files, then "
                         f"make prepare DATA={data_dir}")
    factory = CacheDatasets(metadata, labels, paths.cache, combination, img_size, as_uint8=True, model=model,
                            augment_config=augment_config)
    return RunInputs(folds=folds, labels=labels, test_ids=test_ids, datasets=factory,
                     trainable=factory.cached([*folds["image_id"], *test_ids]))
