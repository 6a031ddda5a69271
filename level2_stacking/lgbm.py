"""One LightGBM binary model per label, cross-validated on the level-1 patient folds.

For each fold the model trains on the other folds' rows and predicts the held-out fold (its
OOF level-2 predictions) and the test rows (averaged over folds). Early stopping watches the
held-out fold's log loss, as level-1 training does. Each fold's Datasets are binned once and
reused for the six labels (only the label changes), which is what makes 870k rows affordable.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from competition.constants import LABELS
from competition.metric import weighted_log_loss

# Deterministic and quiet; num_threads explicit so that two jobs on a shared box do not fight.
FIXED_PARAMS: dict[str, object] = {
    "objective": "binary",
    "metric": "binary_logloss",
    "verbosity": -1,
    "seed": 42,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 2,
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


def _as_matrix(x: pd.DataFrame | np.ndarray) -> np.ndarray:
    return x.to_numpy(dtype=np.float32) if isinstance(x, pd.DataFrame) else np.asarray(x, dtype=np.float32)


def cross_validate(
    x: pd.DataFrame | np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    x_test: pd.DataFrame | np.ndarray | None = None,
    params: dict[str, object] | None = None,
    num_boost_round: int = NUM_BOOST_ROUND,
    early_stopping_rounds: int | None = EARLY_STOPPING_ROUNDS,
    on_fold: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> CVResult:
    """Per-label LightGBM over the given folds.

    ``on_fold(step, running_loss)`` is called after each fold with the weighted log loss of the
    folds done so far (Optuna's pruning hook; it may raise to stop). Without early stopping
    each model trains exactly ``num_boost_round`` rounds.
    """
    params = {**DEFAULT_PARAMS, **(params or {})}
    feature_names = [str(c) for c in x.columns] if isinstance(x, pd.DataFrame) else "auto"
    xm = _as_matrix(x)
    xt = _as_matrix(x_test) if x_test is not None else np.zeros((0, xm.shape[1]), np.float32)
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    if len(xm) != len(y) or len(y) != len(folds) or y.shape[1:] != (len(LABELS),):
        raise ValueError(f"x {xm.shape}, y {y.shape} and folds {folds.shape} do not line up (y must be N x {len(LABELS)})")
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError(f"cross-validation needs at least two folds, got {fold_ids.tolist()}")

    oof = np.full(y.shape, np.nan)
    test = np.zeros((len(xt), len(LABELS)))
    best = np.zeros((len(fold_ids), len(LABELS)), dtype=np.int64)
    fold_losses: dict[int, float] = {}
    done = np.zeros(len(y), dtype=bool)
    bar = tqdm(total=len(fold_ids) * len(LABELS), desc="level-2 LightGBM", unit="model", disable=not progress)
    for step, fold in enumerate(fold_ids):
        val = folds == fold
        dtrain = lgb.Dataset(xm[~val], label=y[~val, 0], feature_name=feature_names)
        dvalid = lgb.Dataset(xm[val], label=y[val, 0], reference=dtrain)
        for j, label in enumerate(LABELS):
            if j:  # reuse the binned Datasets; only the target changes
                dtrain.set_label(y[~val, j])
                dvalid.set_label(y[val, j])
            callbacks = (
                [lgb.early_stopping(early_stopping_rounds, verbose=False, min_delta=EARLY_STOPPING_MIN_DELTA)]
                if early_stopping_rounds else []
            )
            booster = lgb.train(
                params,
                dtrain,
                num_boost_round=num_boost_round,
                valid_sets=[dvalid] if early_stopping_rounds else None,
                callbacks=callbacks,
            )
            rounds = booster.best_iteration if early_stopping_rounds and booster.best_iteration > 0 else booster.current_iteration()
            best[step, j] = rounds
            oof[val, j] = booster.predict(xm[val], num_iteration=rounds)
            if len(xt):
                test[:, j] += booster.predict(xt, num_iteration=rounds) / len(fold_ids)
            bar.update(1)
            bar.set_postfix(fold=int(fold), label=label)
        done |= val
        fold_losses[int(fold)] = weighted_log_loss(y[val], oof[val])
        if on_fold is not None:
            on_fold(step, weighted_log_loss(y[done], oof[done]))
    bar.close()
    return CVResult(oof, test, best, fold_losses, weighted_log_loss(y, oof))
