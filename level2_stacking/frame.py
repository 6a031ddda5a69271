"""The stacking frame: every level-1 model's OOF and test predictions, aligned on image_id.

A join that loses or duplicates an id is an error, never a warning: a level-2 row whose
features came from a model that saw its patient, or from another image, would silently leak.
So every model's OOF must hold exactly the images of the folds table, with the folds table's
fold for each, and every model's test table exactly the same images as the others'.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.paths import WorkPaths
from features.cache import cached_brain_ratios
from features.tabular import BRAIN_COLUMN, TabularFeatureConfig, build_tabular_features, feature_names

OOF_FILE = "oof.parquet"
TEST_FILE = "test.parquet"
EMBEDDINGS_OOF_FILE = "embeddings_oof.npy"    # fold<k>/: row i belongs to fold<k>/oof.parquet row i
EMBEDDINGS_TEST_FILE = "embeddings_test.npy"  # fold<k>/: row i belongs to fold<k>/test.parquet row i


def fold_dir(model_dir: Path, fold: int) -> Path:
    return Path(model_dir) / f"fold{fold}"


class StackFrameError(ValueError):
    """The level-1 outputs or the prepared tables do not line up; the message says which and how."""


@dataclass(frozen=True)
class Level1Output:
    name: str
    oof: pd.DataFrame   # image_id, fold, LABELS
    test: pd.DataFrame  # image_id, LABELS (mean of the fold models)
    fold_test: dict[int, pd.DataFrame]  # fold -> image_id, LABELS of that fold model alone ({} if absent)
    folder: Path


@dataclass(frozen=True)
class StackFrame:
    models: list[str]
    train_ids: np.ndarray             # train image ids, in series order (the feature rows' order)
    test_ids: np.ndarray              # test image ids, in series order
    folds: np.ndarray                 # (N,) int fold of each train row
    y: np.ndarray                     # (N, 6) true labels
    x_train: pd.DataFrame             # (N, F) level-2 features
    x_test: dict[int, pd.DataFrame]   # fold -> (M, F) features of fold model k's own test predictions
    level1_oof: dict[str, np.ndarray]   # model -> (N, 6), rows as train_ids
    level1_test: dict[str, np.ndarray]  # model -> (M, 6), rows as test_ids (mean of the fold models)
    level1_fold_test: dict[str, dict[int, np.ndarray]]  # model -> fold -> (M, 6); {} without per-fold files
    model_dirs: dict[str, Path]
    test_per_fold: bool                 # False: x_test is the mean's features for every fold (old folders)
    config: TabularFeatureConfig = TabularFeatureConfig()  # the features built (brain_ratio off without the cache's)


def _preview(ids: Sequence | pd.Index | np.ndarray, n: int = 3) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:n])) + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


def align_exact(table: pd.DataFrame, ids: pd.Index, what: str) -> pd.DataFrame:
    """``table`` reordered to exactly ``ids`` (by image_id); any duplicated, missing or extra id is an error."""
    if "image_id" not in table.columns:
        raise StackFrameError(f"{what}: no image_id column")
    have = pd.Index(table["image_id"])
    if have.has_duplicates:
        raise StackFrameError(f"{what}: duplicated image_id {_preview(have[have.duplicated()].unique())}")
    missing = ids.difference(have)
    if len(missing):
        raise StackFrameError(f"{what}: {len(missing)} image(s) missing, e.g. {_preview(missing)}")
    extra = have.difference(ids)
    if len(extra):
        raise StackFrameError(f"{what}: {len(extra)} unexpected image(s), e.g. {_preview(extra)}")
    return table.iloc[have.get_indexer(ids)].reset_index(drop=True)


def available_models(paths: WorkPaths) -> list[str]:
    """Level-1 model folders that hold both OOF and test predictions, sorted by name."""
    if not paths.models.is_dir():
        return []
    return sorted(
        d.name for d in paths.models.iterdir() if d.is_dir() and (d / OOF_FILE).is_file() and (d / TEST_FILE).is_file()
    )


def resolve_models(paths: WorkPaths, models: Sequence[str] | None) -> list[str]:
    """The named models (each must have its outputs), or every model folder present."""
    present = available_models(paths)
    if not models:
        if not present:
            raise StackFrameError(
                f"no level-1 model outputs under {paths.models}; run `make oof MODEL=<name>` first"
            )
        return present
    names = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    lacking = [m for m in names if m not in present]
    if lacking:
        raise StackFrameError(
            f"model(s) {lacking} have no {OOF_FILE} + {TEST_FILE} under {paths.models}; "
            f"present: {present or 'none'}"
        )
    return names


def _read_parquet(path: Path, what: str, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise StackFrameError(f"{what} ({path}) not found; run `make prepare` first")
    table = pd.read_parquet(path)
    lacking = [c for c in columns if c not in table.columns]
    if lacking:
        raise StackFrameError(f"{what} ({path}) lacks column(s) {lacking}")
    return table


def _check_probabilities(table: pd.DataFrame, what: str) -> None:
    lacking = [c for c in LABELS if c not in table.columns]
    if lacking:
        raise StackFrameError(f"{what}: lacks label column(s) {lacking}")
    p = table[list(LABELS)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise StackFrameError(f"{what}: probability outside [0, 1] or NaN for {table['image_id'].iloc[row]}")


def load_level1(paths: WorkPaths, name: str, fold_ids: Sequence[int] = ()) -> Level1Output:
    """A model's OOF and mean test tables, and each fold model's own test table where every one exists."""
    folder = paths.model_dir(name)
    oof = pd.read_parquet(folder / OOF_FILE)
    test = pd.read_parquet(folder / TEST_FILE)
    if "fold" not in oof.columns:
        raise StackFrameError(f"{folder / OOF_FILE}: no fold column")
    _check_probabilities(oof, str(folder / OOF_FILE))
    _check_probabilities(test, str(folder / TEST_FILE))
    fold_test: dict[int, pd.DataFrame] = {}
    if fold_ids and all((fold_dir(folder, k) / TEST_FILE).is_file() for k in fold_ids):
        for k in fold_ids:
            path = fold_dir(folder, k) / TEST_FILE
            fold_test[int(k)] = pd.read_parquet(path)
            _check_probabilities(fold_test[int(k)], str(path))
    return Level1Output(name, oof, test, fold_test, folder)


def _check_studies_within_folds(metadata: pd.DataFrame, folds_table: pd.DataFrame, group_col: str) -> None:
    """A row's neighbour and study features come from its study's OOF predictions; they are out of
    fold for the row only if the whole study (and series) lies in the row's fold."""
    table = folds_table[["image_id", "fold"]].merge(
        metadata[["image_id", "series_id", group_col]], on="image_id", how="left", validate="one_to_one"
    )
    for col in ("series_id", group_col):
        spread = table.groupby(col, sort=False)["fold"].nunique()
        if (spread > 1).any():
            raise StackFrameError(
                f"{col} {spread.index[spread > 1][0]} spans several folds: the folds are not grouped by patient; "
                f"rebuild them (`make prepare`) and retrain the level-1 models"
            )


def with_brain_ratio(paths: WorkPaths, metadata: pd.DataFrame,
                     config: TabularFeatureConfig) -> tuple[pd.DataFrame, TabularFeatureConfig]:
    """The metadata with the image cache's brain ratio of each slice (NaN where it was not cached),
    when ``config`` asks for it and the cache holds them; else brain_ratio turned off, and said so
    (a cache built before the ratios were stored: rebuilding it is the user's call, hours on the real data)."""
    if not config.brain_ratio:
        return metadata, config
    ratios = cached_brain_ratios(paths.cache, metadata["image_id"].to_numpy())
    if ratios is None:
        print(f"note: no brain ratios in the image cache {paths.cache} (built before they were stored, or no cache): "
              f"level 2 goes on without the brain_ratio features; a cache built anew (`make cache`) has them")
        return metadata, replace(config, brain_ratio=False)
    return metadata.assign(**{BRAIN_COLUMN: ratios}), config


def build_stack_frame(
    paths: WorkPaths,
    models: Sequence[str] | None = None,
    config: TabularFeatureConfig = TabularFeatureConfig(),
) -> StackFrame:
    """Load, align and featurise every chosen level-1 model's predictions."""
    names = resolve_models(paths, models)
    metadata = _read_parquet(paths.metadata, "metadata", ["image_id", "series_id", "study_id", "slice_index", "n_slices"])
    folds_table = _read_parquet(paths.folds, "folds table", ["image_id", "fold"])
    labels = _read_parquet(paths.labels, "labels", ["image_id", *LABELS])
    metadata, config = with_brain_ratio(paths, metadata, config)

    train_ids = pd.Index(folds_table["image_id"])
    if train_ids.has_duplicates:
        raise StackFrameError(f"folds table: duplicated image_id {_preview(train_ids[train_ids.duplicated()])}")
    folds = folds_table["fold"].to_numpy(dtype=np.int64)
    _check_studies_within_folds(metadata, folds_table, config.group_col)
    labels = align_exact(labels.loc[labels["image_id"].isin(train_ids)], train_ids, "labels of the folds table's images")
    y = labels[list(LABELS)].to_numpy(dtype=np.float64)

    fold_ids = sorted(int(k) for k in np.unique(folds))
    outputs = [load_level1(paths, m, fold_ids) for m in names]
    test_ids = pd.Index(np.sort(outputs[0].test["image_id"].to_numpy()))
    overlap = test_ids.intersection(train_ids)
    if len(overlap):
        raise StackFrameError(f"{names[0]}: test predictions include train images, e.g. {_preview(overlap)}")
    oof_aligned: dict[str, pd.DataFrame] = {}
    test_aligned: dict[str, pd.DataFrame] = {}
    for out in outputs:
        oof = align_exact(out.oof, train_ids, f"{out.name}/{OOF_FILE} vs the folds table")
        moved = oof["fold"].to_numpy() != folds
        if moved.any():
            raise StackFrameError(
                f"{out.name}: OOF folds differ from the folds table for {int(moved.sum())} image(s), "
                f"e.g. {oof['image_id'][moved].iloc[0]}; retrain it on the current folds (`make oof MODEL={out.name}`)"
            )
        oof_aligned[out.name] = oof
        test_aligned[out.name] = align_exact(out.test, test_ids, f"{out.name}/{TEST_FILE} vs {names[0]}/{TEST_FILE}")
    fold_test = {
        out.name: {k: align_exact(t, test_ids, f"{out.name}/fold{k}/{TEST_FILE} vs {names[0]}/{TEST_FILE}")
                   for k, t in out.fold_test.items()}
        for out in outputs
    }
    lacking = [out.name for out in outputs if not out.fold_test]
    if lacking:
        print(f"note: {', '.join(lacking)} lack fold<k>/{TEST_FILE} for some fold: every booster is applied to "
              f"the features of the mean test predictions (their maxima and counts are shrunk); retrain to fix")

    # Train and test featurised apart (a series lies wholly in one split, so nothing changes), in
    # series order: realigning ids, labels and folds is cheaper than reordering the feature matrix.
    # Test features per fold model: booster k learnt on one fold model's predictions, so it is
    # applied to fold model k's own test predictions, never to their (smoother) mean.
    x_train, train_order = _features({m: oof_aligned[m] for m in names}, metadata, config, train_ids)
    if lacking:
        x_mean, test_order = _features({m: test_aligned[m] for m in names}, metadata, config, test_ids)
        x_test = {k: x_mean for k in fold_ids}
    else:
        x_test = {}
        for k in fold_ids:
            x_test[k], test_order = _features({m: fold_test[m][k] for m in names}, metadata, config, test_ids)
    return StackFrame(
        models=names,
        train_ids=train_ids.to_numpy()[train_order],
        test_ids=test_ids.to_numpy()[test_order],
        folds=folds[train_order],
        y=y[train_order],
        x_train=x_train,
        x_test=x_test,
        level1_oof={m: oof_aligned[m][list(LABELS)].to_numpy(np.float64)[train_order] for m in names},
        level1_test={m: test_aligned[m][list(LABELS)].to_numpy(np.float64)[test_order] for m in names},
        level1_fold_test={m: {k: t[list(LABELS)].to_numpy(np.float64)[test_order] for k, t in fold_test[m].items()}
                          for m in names if not lacking},
        model_dirs={out.name: out.folder for out in outputs},
        test_per_fold=not lacking,
        config=config,
    )


def _features(tables: dict[str, pd.DataFrame], metadata: pd.DataFrame, config: TabularFeatureConfig,
              ids: pd.Index) -> tuple[pd.DataFrame, np.ndarray]:
    """Features in series order, and for each of their rows its position in ``ids``."""
    if not len(ids):
        return pd.DataFrame(columns=feature_names(list(tables), config), dtype=np.float32), np.zeros(0, dtype=np.int64)
    features = build_tabular_features(
        {m: t[["image_id", *LABELS]] for m, t in tables.items()}, metadata, config, row_order="series"
    )
    order = ids.get_indexer(features["image_id"])
    return features.drop(columns="image_id"), order
