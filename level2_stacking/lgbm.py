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
from competition.progress import progress_bar

from competition.constants import LABELS
from competition.metric import weighted_log_loss


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
NUM_BOOST_ROUND = 5000
EARLY_STOPPING_ROUNDS = 100
# A round must gain at least this much held-out log loss to count as progress: on nearly
# separable data the loss creeps down by 1e-7 a round for thousands of rounds otherwise.
EARLY_STOPPING_MIN_DELTA = 1e-5


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
        dfit = lgb.Dataset(xm[fit], label=y[fit, 0], feature_name=feature_names, params=params).construct()
        dstop = (lgb.Dataset(xm[inner], label=y[inner, 0], reference=dfit, params=params).construct()
                 if early_stopping_rounds else None)
        boosters: list[tuple[lgb.Booster, int]] = []
        for j in range(len(LABELS)):
            if j:  # reuse the binned Datasets; only the target changes
                dfit.set_label(y[fit, j])
                if dstop is not None:
                    dstop.set_label(y[inner, j])
            boosters.append(_train(params, dfit, num_boost_round, dstop, early_stopping_rounds))
            if not (early_stopping_rounds and refit):
                bar.update(1)
        del dfit, dstop
        if early_stopping_rounds and refit:  # every training fold, more rounds for more rows
            dall = lgb.Dataset(xm[train], label=y[train, 0], feature_name=feature_names, params=params).construct()
            for j, (_, rounds) in enumerate(boosters):
                if j:
                    dall.set_label(y[train, j])
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
