"""One LightGBM binary model per label, cross-validated on the level-1 patient folds.

For each fold the model trains on the other folds' rows and predicts the held-out fold (its
OOF level-2 predictions) and the test rows (averaged over folds; booster k is applied to the
features of fold model k's own test predictions when given per fold). Early stopping never
watches the held-out fold (that would tune the reported OOF score on itself): it watches an
inner fold, one of the training folds, and the booster is then refit on all training folds for
the rounds found, scaled by the share of rows added. Each Dataset is binned once and reused for
the six labels (only the label changes), which is what makes 870k rows affordable.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.stats import rankdata

from competition.constants import LABELS
from competition.metric import weighted_log_loss
from competition.progress import progress_bar


def default_threads() -> int:
    """The cores this process may use (affinity-aware): the product's default, THREADS= overrides."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Deterministic and quiet; num_threads explicit (all usable cores unless told otherwise).
FIXED_PARAMS: dict[str, object] = {
    "objective": "binary",
    "metric": "binary_logloss",
    "verbosity": -1,
    "seed": 42,
    "deterministic": True,
    # Column-wise histograms: ~1 byte per (row, feature) where row-wise bins took ~9 at 813
    # features (measured), and LightGBM's advice for many features and many threads.
    "force_col_wise": True,
    "num_threads": default_threads(),
}
# Sensible untuned defaults (what `make stack` uses before any Optuna study).
DEFAULT_PARAMS: dict[str, object] = {
    **FIXED_PARAMS,
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 100,
    "feature_fraction": 0.5,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l1": 0.0,
    "lambda_l2": 1.0,
}
# From this many training rows on, the defaults above are used as they are (the real competition
# has 752k); below, ``sized_params`` shrinks the trees, raises L2 and pre-selects features.
FULL_SIZE_ROWS = 200_000
# Our own key (LightGBM never sees it): per label, keep at most this many features, chosen on the
# training rows of each fold (``preselect``); absent or None: every feature.
MAX_FEATURES = "max_features"
NUM_BOOST_ROUND = 5000
EARLY_STOPPING_ROUNDS = 100
# A round must gain at least this much held-out log loss to count as progress: on nearly
# separable data the loss creeps down by 1e-7 a round for thousands of rounds otherwise.
EARLY_STOPPING_MIN_DELTA = 1e-5


def sized_params(n_rows: int, base: Mapping[str, object] = DEFAULT_PARAMS) -> dict[str, object]:
    """``base`` with regularisation and feature count scaled to ``n_rows`` training rows.

    Below ``FULL_SIZE_ROWS``: fewer leaves (n/200, 7..31), fewer rows a leaf (n/40, 20..100, so
    a leaf still needs a few patients' slices), more L2 (20k/n, 1..10) and at most n/25 features
    (>= 24) a label. At 835 rows that is 7 leaves and 33 of 489 features; at 752k, ``base``.
    """
    params = dict(base)
    if n_rows >= FULL_SIZE_ROWS:
        return params
    n = max(int(n_rows), 1)
    max_features = max(24, n // 25)
    params.update(
        num_leaves=int(np.clip(n // 200, 7, 31)),
        min_data_in_leaf=int(np.clip(n // 40, 20, 100)),
        lambda_l2=float(np.clip(20_000 / n, 1.0, 10.0)),
        feature_fraction=0.8 if max_features < 64 else 0.5,  # few features left: sample most of them
    )
    params[MAX_FEATURES] = max_features
    return params


def _rank_columns(x: np.ndarray) -> np.ndarray:
    """Column-wise ranks (average of ties; NaN ranked as the column's middle), centred."""
    filled = np.where(np.isnan(x), np.nanmedian(np.where(np.isnan(x).all(0), 0.0, x), axis=0), x)
    ranks = rankdata(filled, axis=0)
    return ranks - ranks.mean(axis=0)


def preselect(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` columns of ``x`` with the largest |rank correlation| with ``y``
    (all columns when k >= their count; none preferred when y is constant: the first k)."""
    if k >= x.shape[1]:
        return np.ones(x.shape[1], dtype=bool)
    yc = y - y.mean()
    if not yc.any():
        score = -np.arange(x.shape[1], dtype=np.float64)
    else:
        r = _rank_columns(x)
        denom = np.sqrt((r ** 2).sum(axis=0) * (yc ** 2).sum())
        score = np.abs(r.T @ yc) / np.where(denom > 0, denom, np.inf)
    keep = np.zeros(x.shape[1], dtype=bool)
    keep[np.argsort(-score, kind="stable")[:k]] = True
    return keep


def _masked(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``x`` with the dropped columns all NaN: LightGBM never splits on them, and the booster still
    takes the full feature table (what `make predict` and the test rows hand it)."""
    out = x.copy()
    out[:, ~keep] = np.nan
    return out


@dataclass(frozen=True)
class CVResult:
    oof: np.ndarray               # (N, 6) level-2 OOF probabilities
    test: np.ndarray              # (M, 6) mean over folds of the test probabilities
    best_iterations: np.ndarray   # (n_folds, 6) boosting rounds used
    fold_losses: dict[int, float] # weighted log loss of each held-out fold
    loss: float                   # weighted log loss of the whole OOF table
    # fold -> per label (booster, rounds): kept only when asked (``keep_models``), for `make predict`
    models: dict[int, list[tuple[lgb.Booster, int]]] = field(default_factory=dict)


def _as_matrix(x: pd.DataFrame | np.ndarray) -> np.ndarray:
    return x.to_numpy(dtype=np.float32) if isinstance(x, pd.DataFrame) else np.asarray(x, dtype=np.float32)


TestFeatures = pd.DataFrame | np.ndarray | Mapping[int, pd.DataFrame | np.ndarray] | None


def _test_matrices(x_test: TestFeatures, fold_ids: np.ndarray, n_features: int) -> dict[int, np.ndarray]:
    """Fold -> test matrix: one table for every fold, or one per fold (fold model k's own predictions)."""
    if x_test is None:
        empty = np.zeros((0, n_features), np.float32)
        return {int(f): empty for f in fold_ids}
    if isinstance(x_test, Mapping):
        lacking = [int(f) for f in fold_ids if int(f) not in x_test]
        if lacking:
            raise ValueError(f"test features given per fold lack fold(s) {lacking}")
        converted: dict[int, np.ndarray] = {}
        by_id: dict[int, np.ndarray] = {}  # the same table for several folds is converted once
        for f in fold_ids:
            table = x_test[int(f)]
            converted[int(f)] = by_id.setdefault(id(table), _as_matrix(table))
        return converted
    matrix = _as_matrix(x_test)
    return {int(f): matrix for f in fold_ids}


def _dataset(xm: np.ndarray, rows: np.ndarray, y: np.ndarray, names: list[str] | str, params: dict[str, object],
             keep: np.ndarray | None, reuse: lgb.Dataset | None, reference: lgb.Dataset | None = None) -> lgb.Dataset:
    """The binned Dataset of ``rows`` with target ``y``: ``reuse`` relabelled when given, else
    binned anew (only the ``keep`` columns usable when given)."""
    if reuse is not None:
        reuse.set_label(y[rows])
        return reuse
    data = xm[rows] if keep is None else _masked(xm[rows], keep)
    return lgb.Dataset(data, label=y[rows], feature_name=names, reference=reference, params=params).construct()


def constant_booster(rate: float, names: list[str] | str, n_features: int, params: dict[str, object]) -> lgb.Booster:
    """A one-leaf booster that predicts ``rate`` for every row: for a fold whose training rows hold
    one class only of a label, where boosting would predict ~1e-15 for it (a held-out positive then
    costs ~34 nats). A real Booster, so the fitted stack saves and applies it like any other."""
    x = np.zeros((2, n_features))
    data = lgb.Dataset(x, label=[1.0, 0.0], weight=[rate, 1.0 - rate], feature_name=names,
                       params={"min_data_in_bin": 1, "verbosity": -1})
    keys = ("objective", "verbosity", "seed", "deterministic", "num_threads")
    one_leaf = {**{k: params[k] for k in keys if k in params}, "min_data_in_leaf": 2, "boost_from_average": True,
                "learning_rate": 1e-12}
    return lgb.train(one_leaf, data, num_boost_round=1)


def smoothed_rate(y: np.ndarray) -> float:
    """The training rate of a label pulled away from 0 and 1 (add-one-half, Jeffreys)."""
    return float((y.sum() + 0.5) / (len(y) + 1.0))


def _train(params: dict[str, object], dtrain: lgb.Dataset, rounds: int, dvalid: lgb.Dataset | None = None,
           early_stopping_rounds: int | None = None) -> tuple[lgb.Booster, int]:
    callbacks = ([lgb.early_stopping(early_stopping_rounds, verbose=False, min_delta=EARLY_STOPPING_MIN_DELTA)]
                 if dvalid is not None else [])
    booster = lgb.train(params, dtrain, num_boost_round=rounds, valid_sets=[dvalid] if dvalid is not None else None,
                        callbacks=callbacks)
    used = booster.best_iteration if dvalid is not None and booster.best_iteration > 0 else booster.current_iteration()
    return booster, used


def cross_validate(
    x: pd.DataFrame | np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    x_test: TestFeatures = None,
    params: dict[str, object] | None = None,
    num_boost_round: int = NUM_BOOST_ROUND,
    early_stopping_rounds: int | None = EARLY_STOPPING_ROUNDS,
    on_fold: Callable[[int, float], None] | None = None,
    progress: bool = True,
    refit: bool = True,
    keep_models: bool = False,
) -> CVResult:
    """Per-label LightGBM over the given folds.

    ``x_test``: one table for every fold, or {fold: table} (booster k predicts table k). With
    early stopping, the rounds are found on an inner fold (the next training fold) and, with
    ``refit``, the booster is retrained on all training folds for those rounds scaled by the
    rows added; without ``refit`` the inner booster predicts. ``on_fold(step, running_loss)`` is
    called after each fold with the weighted log loss of the folds done so far (Optuna's pruning
    hook; it may raise to stop). ``keep_models`` returns each fold's boosters (what a new study is
    predicted with). Without early stopping each model trains exactly
    ``num_boost_round`` rounds on all training folds (sklearn's cross_val_predict).
    """
    params = {**DEFAULT_PARAMS, **(params or {})}
    max_features = params.pop(MAX_FEATURES, None)
    feature_names = [str(c) for c in x.columns] if isinstance(x, pd.DataFrame) else "auto"
    xm = _as_matrix(x)
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    if len(xm) != len(y) or len(y) != len(folds) or y.shape[1:] != (len(LABELS),):
        raise ValueError(f"x {xm.shape}, y {y.shape} and folds {folds.shape} do not line up (y must be N x {len(LABELS)})")
    fold_ids = np.unique(folds)
    min_folds = 3 if early_stopping_rounds else 2
    if len(fold_ids) < min_folds:
        raise ValueError(f"cross-validation needs at least {min_folds} folds (early stopping watches an inner one), "
                         f"got {fold_ids.tolist()}")
    tests = _test_matrices(x_test, fold_ids, xm.shape[1])
    n_test = len(next(iter(tests.values())))

    oof = np.full(y.shape, np.nan)
    test = np.zeros((n_test, len(LABELS)))
    best = np.zeros((len(fold_ids), len(LABELS)), dtype=np.int64)
    fold_losses: dict[int, float] = {}
    kept: dict[int, list[tuple[lgb.Booster, int]]] = {}
    done = np.zeros(len(y), dtype=bool)
    bar = progress_bar(total=len(fold_ids) * len(LABELS), desc="level-2 LightGBM", unit="model", disable=not progress)
    for step, fold in enumerate(fold_ids):
        val = folds == fold
        train = ~val
        inner = folds == fold_ids[(step + 1) % len(fold_ids)]
        fit = train & ~inner if early_stopping_rounds else train
        # Each Dataset is binned at once, so its copy of the rows is freed before the next is made
        # (at 752k rows x 800 features a copy is ~2 GB); the refit's Dataset is made only after the
        # early-stopping pair is freed, so at most two binned Datasets live at a time.
        keeps = ([preselect(xm[fit], y[fit, j], max_features) for j in range(len(LABELS))]
                 if max_features is not None and max_features < xm.shape[1] else [None] * len(LABELS))
        reuse = keeps[0] is None  # one binning for the six labels (only the target changes)
        learnt_on = train if not early_stopping_rounds or refit else fit
        # A label with one class in the rows its booster learns from has nothing to learn: boosting
        # would drive it to ~1e-15; it gets the smoothed rate, and no rounds are spent on it. (Its
        # Datasets are built only when the labels after it reuse their binning.)
        constant = {j: (constant_booster(smoothed_rate(y[learnt_on, j]), feature_names, xm.shape[1], params), 1)
                    for j in range(len(LABELS)) if len(np.unique(y[learnt_on, j])) < 2}
        dfit = dstop = None
        boosters: list[tuple[lgb.Booster, int]] = []
        for j in range(len(LABELS)):
            if reuse or j not in constant:
                dfit = _dataset(xm, fit, y[:, j], feature_names, params, keeps[j], dfit if reuse else None)
                if early_stopping_rounds:
                    dstop = _dataset(xm, inner, y[:, j], feature_names, params, None, dstop if reuse else None,
                                     reference=dfit)
            boosters.append(constant[j] if j in constant else _train(params, dfit, num_boost_round, dstop,
                                                                      early_stopping_rounds))
            if not (early_stopping_rounds and refit):
                bar.update(1)
        del dfit, dstop
        if early_stopping_rounds and refit:  # every training fold, more rounds for more rows
            dall = None
            for j, (_, rounds) in enumerate(boosters):
                if reuse or j not in constant:
                    dall = _dataset(xm, train, y[:, j], feature_names, params, keeps[j], dall if reuse else None)
                if j not in constant:
                    boosters[j] = _train(params, dall, max(1, round(rounds * train.sum() / fit.sum())))
                bar.update(1)
            del dall
        for j, (booster, rounds) in enumerate(boosters):
            best[step, j] = rounds
            oof[val, j] = booster.predict(xm[val], num_iteration=rounds)
            if n_test:
                test[:, j] += booster.predict(tests[int(fold)], num_iteration=rounds) / len(fold_ids)
        if keep_models:
            kept[int(fold)] = boosters
        bar.set_postfix(fold=int(fold))
        done |= val
        fold_losses[int(fold)] = weighted_log_loss(y[val], oof[val])
        if on_fold is not None:
            on_fold(step, weighted_log_loss(y[done], oof[done]))
    bar.close()
    return CVResult(oof, test, best, fold_losses, weighted_log_loss(y, oof), kept)
