"""Level-2 tabular features from level-1 slice probabilities: neighbour slices and study statistics.

A hemorrhage spans several consecutive slices, and a study with one bleeding slice usually has
more, so a slice's label is predicted better from its own level-1 probabilities together with
those of its neighbours in z and of its whole study. Everything here is vectorised over the
whole table (no Python loop over series or studies): rows are put in series order once, and
neighbours are array shifts masked at series ends; study statistics come from one sort.

Neighbours are the adjacent rows of the same series in the table, sorted by ``slice_index``
(so a slice dropped as unreadable is skipped over, not turned into a hole). Missing neighbours
(past either end of a series) are NaN, never zeros: LightGBM treats NaN as "missing".

With ``brain_ratio`` on, the slice's share of brain-window pixels (``features.cache.brain_ratio``,
read from the image cache into a metadata column of that name) and its neighbours' are features
too: it tells the skull base and the vertex, where little brain shows, from mid-brain slices.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from competition.constants import LABELS

META_COLUMNS = ("image_id", "study_id", "series_id", "slice_index", "n_slices")
GLOBAL_FEATURES = ("pos_rel", "series_len", "study_len")
BRAIN_COLUMN = "brain_ratio"  # the metadata column the brain features read (features.cache.cached_brain_ratios)
BRAIN_OFFSETS = (1, 2)         # the neighbours whose brain ratio is a feature too


class TabularFeatureError(ValueError):
    """The predictions or the metadata cannot make a feature table; the message says why."""


@dataclass(frozen=True)
class TabularFeatureConfig:
    k_neighbours: int = 5                          # previous and next slices taken as features
    rolling_windows: tuple[int, ...] = (3, 5, 9)   # centred windows (odd widths) of mean and max
    quantiles: tuple[float, ...] = (0.75, 0.9, 0.95)
    thresholds: tuple[float, ...] = (0.1, 0.5, 0.9)
    group_col: str = "study_id"                    # the "study" of the study statistics
    # The slice minus each neighbour (2k columns per label): off by default, as dropping them
    # lowered the stack's OOF and test loss on two fabricated competitions (README).
    diffs: bool = False
    # Far neighbours of the `any` probability only (3rd place: +-1..20, 11th: +-1..9): each offset
    # d gives any's prev<d> and next<d>, beside the per-label ones. Off by default: (10, 20) left the
    # sized LightGBM's OOF unchanged on two fabricated 30-patient competitions (0.0564, 0.0686), and
    # a 21-slice rolling window raised it (0.0580, 0.0714), so neither is on.
    any_shifts: tuple[int, ...] = ()
    # The brain ratio of the slice and of its BRAIN_OFFSETS neighbours; needs a BRAIN_COLUMN in the
    # metadata. Off here: level 2 turns it on where the image cache holds the ratios (StackSettings).
    brain_ratio: bool = False

    def __post_init__(self) -> None:
        if self.k_neighbours < 0:
            raise TabularFeatureError(f"k_neighbours must be >= 0, got {self.k_neighbours}")
        bad = [w for w in self.rolling_windows if w < 3 or w % 2 == 0]
        if bad:
            raise TabularFeatureError(f"rolling windows must be odd and >= 3 (centred on the slice), got {bad}")
        if any(d <= self.k_neighbours for d in self.any_shifts) or len(set(self.any_shifts)) != len(self.any_shifts):
            raise TabularFeatureError(f"any_shifts must be distinct offsets beyond k_neighbours={self.k_neighbours}, "
                                      f"got {self.any_shifts}")
        if any(not 0 < q < 1 for q in self.quantiles) or any(not 0 < t < 1 for t in self.thresholds):
            raise TabularFeatureError("quantiles and thresholds must lie strictly between 0 and 1")

    @property
    def max_offset(self) -> int:
        return max([self.k_neighbours, *(w // 2 for w in self.rolling_windows)])


def _tag(x: float) -> str:
    """0.95 -> '95', 0.5 -> '50', 0.125 -> '125': feature names without dots."""
    return f"{x:.3f}".split(".")[1].rstrip("0").ljust(2, "0")


def label_feature_names(config: TabularFeatureConfig) -> list[str]:
    """Per-label feature suffixes, in the order they are computed."""
    k = config.k_neighbours
    names = ["self"]
    names += [f"prev{d}" for d in range(1, k + 1)] + [f"next{d}" for d in range(1, k + 1)]
    if config.diffs:
        names += [f"diff_prev{d}" for d in range(1, k + 1)] + [f"diff_next{d}" for d in range(1, k + 1)]
    for w in config.rolling_windows:
        names += [f"roll_mean{w}", f"roll_max{w}"]
    names += ["study_max", "study_mean", "study_std"]
    names += [f"study_q{_tag(q)}" for q in config.quantiles]
    names += [f"study_n_gt{_tag(t)}" for t in config.thresholds]
    names += ["study_rank"]
    return names


def any_feature_names(config: TabularFeatureConfig) -> list[str]:
    """Suffixes of the `any`-only features (far neighbours), after a model's per-label ones."""
    return [f"{side}{d}" for d in config.any_shifts for side in ("prev", "next")]


def global_feature_names(config: TabularFeatureConfig) -> list[str]:
    """The columns that do not depend on a model: position, lengths, and the brain ratios."""
    brain = [BRAIN_COLUMN] + [f"{BRAIN_COLUMN}_{side}{d}" for d in BRAIN_OFFSETS for side in ("prev", "next")]
    return list(GLOBAL_FEATURES) + (brain if config.brain_ratio else [])


def feature_names(models: list[str], config: TabularFeatureConfig) -> list[str]:
    """Every column of the feature table except ``image_id``."""
    per_label = label_feature_names(config)
    return global_feature_names(config) + [
        name for m in models
        for name in [f"{m}__{label}__{s}" for label in LABELS for s in per_label]
        + [f"{m}__any__{s}" for s in any_feature_names(config)]
    ]


@dataclass(frozen=True)
class _Order:
    """The table put in series order, with each row's place in its series and its study."""

    order: np.ndarray   # table row of each series-order row
    pos: np.ndarray     # position within its series (series order)
    length: np.ndarray  # rows of its series (series order)
    study: np.ndarray   # study code (series order)
    n_study: int

    @classmethod
    def from_meta(cls, meta: pd.DataFrame, group_col: str) -> "_Order":
        series_codes, _ = pd.factorize(meta["series_id"], sort=False)
        study_codes, study_uniques = pd.factorize(meta[group_col], sort=False)
        order = np.lexsort((meta["slice_index"].to_numpy(), series_codes))
        s = series_codes[order]
        n = len(s)
        starts_mask = np.r_[True, s[1:] != s[:-1]] if n else np.zeros(0, bool)
        start_rows = np.flatnonzero(starts_mask)
        run = np.cumsum(starts_mask) - 1
        lengths = np.diff(np.r_[start_rows, n])
        pos = np.arange(n) - start_rows[run]
        return cls(order, pos, lengths[run], study_codes[order], len(study_uniques))


def _shift(p: np.ndarray, pos: np.ndarray, length: np.ndarray, d: int) -> np.ndarray:
    """Slice i gets slice i+d of its own series (d < 0: previous slices), NaN past the series ends.

    ``p`` is label-major, (labels, rows in series order), so every label's row is contiguous.
    """
    out = np.full_like(p, np.nan)
    n = p.shape[1]
    if d > 0:
        out[:, : n - d] = p[:, d:]
    elif d < 0:
        out[:, -d:] = p[:, : n + d]
    else:
        out[:] = p
    out[:, (pos + d < 0) | (pos + d >= length)] = np.nan
    return out


def _rolling_mean(p: np.ndarray, pos: np.ndarray, length: np.ndarray, half: int) -> np.ndarray:
    """Mean over the centred window clipped to the series (edges average what is there)."""
    cs = np.zeros((p.shape[0], p.shape[1] + 1))
    np.cumsum(p, axis=1, dtype=np.float64, out=cs[:, 1:])
    rows = np.arange(p.shape[1])
    lo = rows - np.minimum(half, pos)
    hi = rows + np.minimum(half, length - 1 - pos)
    return (cs[:, hi + 1] - cs[:, lo]) / (hi - lo + 1)


def _study_sort(v: np.ndarray, study: np.ndarray) -> np.ndarray:
    """Row order by (study, value): a value sort, then a stable (radix) sort on the integer study code."""
    by_value = np.argsort(v, kind="stable")
    return by_value[np.argsort(study[by_value], kind="stable")]


def _study_stats(v: np.ndarray, study: np.ndarray, n_study: int, config: TabularFeatureConfig) -> list[np.ndarray]:
    """Study statistics of one label column, broadcast back to every slice (series order).

    Returns [max, mean, std (ddof=0), quantiles (linear, as numpy), counts above thresholds,
    rank within the study (average rank of ties / study size, as pandas rank(pct=True))].
    """
    n = np.bincount(study, minlength=n_study)
    o = _study_sort(v, study)
    vs, ss = v[o], study[o]
    starts = np.r_[0, np.cumsum(n)[:-1]]
    mean = np.bincount(study, weights=v, minlength=n_study) / n
    std = np.sqrt(np.bincount(study, weights=(v - mean[study]) ** 2, minlength=n_study) / n)
    out = [vs[starts + n - 1][study], mean[study], std[study]]
    for q in config.quantiles:
        at = starts + q * (n - 1)
        lo = np.floor(at).astype(np.int64)
        hi = np.minimum(lo + 1, starts + n - 1)
        out.append((vs[lo] + (at - lo) * (vs[hi] - vs[lo]))[study])
    for t in config.thresholds:
        out.append(np.bincount(study, weights=(v > t).astype(np.float64), minlength=n_study)[study])
    # Average rank of ties: runs of equal (study, value) in sorted order share the mean position.
    within = np.arange(len(vs)) - starts[ss] + 1
    new_run = np.r_[True, (ss[1:] != ss[:-1]) | (vs[1:] != vs[:-1])]
    run = np.cumsum(new_run) - 1
    first = within[new_run]
    last = first + np.bincount(run) - 1
    rank = np.empty(len(v))
    rank[o] = ((first + last) / 2)[run] / n[ss]
    out.append(rank)
    return out


def _align(predictions: Mapping[str, pd.DataFrame], metadata: pd.DataFrame,
           config: TabularFeatureConfig) -> tuple[pd.Index, dict[str, np.ndarray], pd.DataFrame]:
    if not predictions:
        raise TabularFeatureError("no level-1 predictions given")
    names = list(predictions)
    bad_names = [m for m in names if not m or "__" in m]
    if bad_names:
        raise TabularFeatureError(f"model names must be non-empty and free of '__' (the column separator): {bad_names}")
    first = predictions[names[0]]
    ids = pd.Index(first["image_id"])
    if ids.has_duplicates:
        raise TabularFeatureError(f"{names[0]}: duplicated image_id {ids[ids.duplicated()][0]}")
    probs: dict[str, np.ndarray] = {}
    for m in names:
        df = predictions[m]
        missing = [c for c in ("image_id", *LABELS) if c not in df.columns]
        if missing:
            raise TabularFeatureError(f"{m}: predictions lack column(s) {missing}")
        if len(df) != len(ids) or not ids.equals(pd.Index(df["image_id"])):
            raise TabularFeatureError(f"{m}: image_id rows differ from {names[0]}'s; align the level-1 tables first")
        p = df[list(LABELS)].to_numpy(dtype=np.float64)
        if not np.isfinite(p).all():
            raise TabularFeatureError(f"{m}: predictions contain NaN or inf")
        probs[m] = p
    lacking = [c for c in META_COLUMNS if c not in metadata.columns]
    if config.brain_ratio and BRAIN_COLUMN not in metadata.columns:
        raise TabularFeatureError(f"metadata lacks the {BRAIN_COLUMN!r} column the brain features read "
                                  f"(features.cache.cached_brain_ratios); add it or turn brain_ratio off")
    if lacking:
        raise TabularFeatureError(f"metadata lacks column(s) {lacking}; rebuild it with `make prepare`")
    meta_ids = pd.Index(metadata["image_id"])
    if meta_ids.has_duplicates:
        raise TabularFeatureError(f"metadata has duplicated image_id {meta_ids[meta_ids.duplicated()][0]}")
    at = meta_ids.get_indexer(ids)
    if (at < 0).any():
        raise TabularFeatureError(
            f"{int((at < 0).sum())} predicted image(s) are not in the metadata, e.g. {ids[at < 0][0]}; "
            f"were the level-1 models run on another DATA?"
        )
    meta = metadata.iloc[at].reset_index(drop=True)
    return ids, probs, meta


def build_tabular_features(
    predictions: Mapping[str, pd.DataFrame],
    metadata: pd.DataFrame,
    config: TabularFeatureConfig = TabularFeatureConfig(),
    row_order: str = "input",
) -> pd.DataFrame:
    """Neighbour-slice and study features of every row of the level-1 prediction tables.

    ``predictions``: model name -> table of ``image_id`` + the six LABELS probabilities, every
    table with the same image_id rows in the same order (train OOF and test stacked together:
    a series lies wholly in one split). ``metadata``: the metadata table (``META_COLUMNS`` at
    least, plus ``config.group_col``). Returns ``image_id`` + ``feature_names(...)`` (float32);
    columns are ``<model>__<label>__<feature>``. Rows come in the order of the prediction tables
    (``row_order="input"``) or in series order (``"series"``: each series' rows together, by slice_index), which
    skips a random-access gather of every column (~12% of the time on 200k rows x 2 models): a
    caller that can realign its few per-row arrays instead (ids, labels, folds) may ask for it.
    """
    if row_order not in ("input", "series"):
        raise TabularFeatureError(f"row_order must be 'input' or 'series', got {row_order!r}")
    ids, probs, meta = _align(predictions, metadata, config)
    if config.group_col not in meta.columns:
        raise TabularFeatureError(f"metadata lacks the study column {config.group_col!r}")
    ord_ = _Order.from_meta(meta, config.group_col)
    names = feature_names(list(probs), config)
    per_label = len(label_feature_names(config))
    # Computed in series order, label-major (each label's values contiguous), then (row_order
    # "input") gathered back to the table's row order, one contiguous output column at a time.
    out = np.empty((len(ids), len(names)), dtype=np.float32, order="F")
    rows = ord_.order
    back = np.empty_like(rows)
    back[rows] = np.arange(len(rows))

    def put(column: int, values_in_series_order: np.ndarray) -> None:
        out[:, column] = values_in_series_order[back] if row_order == "input" else values_in_series_order

    slice_index = meta["slice_index"].to_numpy()[rows]
    n_slices = meta["n_slices"].to_numpy()[rows].astype(np.float64)
    put(0, np.where(n_slices > 1, slice_index / np.maximum(n_slices - 1, 1), 0.5))
    put(1, n_slices)
    put(2, np.bincount(ord_.study, minlength=ord_.n_study)[ord_.study])
    col = len(GLOBAL_FEATURES)
    if config.brain_ratio:
        brain = meta[BRAIN_COLUMN].to_numpy(np.float32)[rows][None]
        put(col, brain[0])
        col += 1
        for d in BRAIN_OFFSETS:
            put(col, _shift(brain, ord_.pos, ord_.length, -d)[0])
            put(col + 1, _shift(brain, ord_.pos, ord_.length, d)[0])
            col += 2

    k = config.k_neighbours
    for m, p_table in probs.items():
        p64 = np.ascontiguousarray(p_table[rows].T)  # (labels, rows in series order)
        p = p64.astype(np.float32)
        shifts = {d: _shift(p, ord_.pos, ord_.length, d) for d in range(-config.max_offset, config.max_offset + 1) if d}
        blocks = [p]
        blocks += [shifts[-d] for d in range(1, k + 1)] + [shifts[d] for d in range(1, k + 1)]
        if config.diffs:
            blocks += [p - shifts[-d] for d in range(1, k + 1)] + [p - shifts[d] for d in range(1, k + 1)]
        # Rolling max grows window by window: each wider window adds two shifts to the narrower one's max.
        running, reach, maxes = p.copy(), 0, {}
        for w in sorted(set(config.rolling_windows)):
            for d in range(reach + 1, w // 2 + 1):
                np.fmax(running, shifts[-d], out=running)
                np.fmax(running, shifts[d], out=running)
            reach = w // 2
            maxes[w] = running.copy()
        for w in config.rolling_windows:
            blocks += [_rolling_mean(p64, ord_.pos, ord_.length, w // 2), maxes[w]]
        for j in range(len(LABELS)):
            base = col + j * per_label
            for i, block in enumerate(blocks):
                put(base + i, block[j])
            for i, stat in enumerate(_study_stats(p64[j], ord_.study, ord_.n_study, config)):
                put(base + len(blocks) + i, stat)
        col += len(LABELS) * per_label
        any_row = p[LABELS.index("any")][None]
        for d in config.any_shifts:  # only `any`: far shifts of all six labels would cost 6x the memory
            put(col, _shift(any_row, ord_.pos, ord_.length, -d)[0])
            put(col + 1, _shift(any_row, ord_.pos, ord_.length, d)[0])
            col += 2
    assert col == len(names)
    frame = pd.DataFrame(out, columns=names, copy=False)
    frame.insert(0, "image_id", ids.to_numpy() if row_order == "input" else ids.to_numpy()[rows])
    return frame
