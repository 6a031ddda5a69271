"""LightGBM sized to its data: the pre-selection ranks like scipy's Spearman column by column, the
boosters never split on a dropped column yet take the full table, and the sizing relaxes towards
the defaults as the rows grow."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from competition.constants import LABELS
from level2_stacking import lgbm
from level2_stacking.lgbm import DEFAULT_PARAMS, FULL_SIZE_ROWS, MAX_FEATURES, cross_validate, preselect, sized_params


def _spearman_top(x: np.ndarray, y: np.ndarray, k: int) -> set[int]:
    """Brute force: one column at a time, NaN filled with the column's median."""
    scores = []
    for c in range(x.shape[1]):
        col = x[:, c].astype(np.float64)
        col = np.where(np.isnan(col), np.nanmedian(col), col)
        rho = spearmanr(col, y).statistic
        scores.append(0.0 if np.isnan(rho) else abs(rho))
    return set(np.argsort(-np.asarray(scores), kind="stable")[:k].tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preselect_keeps_the_columns_spearman_ranks_first(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, f = 300, 40
    y = (rng.random(n) < 0.2).astype(np.float64)
    x = rng.normal(size=(n, f)) + np.outer(y, rng.normal(0, 0.6, f))  # columns of every strength
    x[rng.random(x.shape) < 0.15] = np.nan
    x[:, 3] = np.round(x[:, 3])  # ties
    for k in (1, 5, 17):
        keep = preselect(x.astype(np.float32), y, k)
        assert keep.sum() == k
        assert set(np.flatnonzero(keep).tolist()) == _spearman_top(x.astype(np.float32), y, k)
    assert preselect(x, y, f + 3).all()
    assert preselect(x, np.zeros(n), 4).sum() == 4  # a label with no positive: any k columns, no error


def test_sized_params_relax_towards_the_defaults_as_rows_grow() -> None:
    assert sized_params(FULL_SIZE_ROWS) == DEFAULT_PARAMS
    assert sized_params(752_803) == DEFAULT_PARAMS
    sizes = [300, 835, 3_000, 12_000, 60_000, FULL_SIZE_ROWS - 1]
    p = [sized_params(n) for n in sizes]
    for a, b in zip(p, p[1:]):
        assert a["num_leaves"] <= b["num_leaves"] <= DEFAULT_PARAMS["num_leaves"]
        assert a["min_data_in_leaf"] <= b["min_data_in_leaf"] <= DEFAULT_PARAMS["min_data_in_leaf"]
        assert a["lambda_l2"] >= b["lambda_l2"] >= DEFAULT_PARAMS["lambda_l2"]
        assert a[MAX_FEATURES] <= b[MAX_FEATURES]
    assert sized_params(835)[MAX_FEATURES] < 489 / 4  # the demo's 489 features cut to a few dozen


def test_boosters_split_only_on_their_labels_preselected_columns() -> None:
    rng = np.random.default_rng(7)
    n, f, k = 900, 30, 4
    x = rng.normal(size=(n, f)).astype(np.float32)
    logit = x[:, :6] * 2.0  # label j depends on column j only
    y = (rng.random((n, len(LABELS))) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    folds = rng.integers(0, 3, n)
    columns = [f"f{i}" for i in range(f)]
    params = {**DEFAULT_PARAMS, "num_threads": 1, "learning_rate": 0.2, "min_data_in_leaf": 20, MAX_FEATURES: k}
    result = cross_validate(pd.DataFrame(x, columns=columns), y, folds, pd.DataFrame(x[:50], columns=columns),
                            params=params, num_boost_round=30, early_stopping_rounds=None, progress=False,
                            keep_models=True)
    for fold, boosters in result.models.items():
        fit = folds != fold
        for j, (booster, _) in enumerate(boosters):
            used = booster.feature_importance("split") > 0
            keep = preselect(x[fit], y[fit, j], k)
            assert not (used & ~keep).any(), f"fold {fold} label {j} split on a dropped column"
            assert used[j], f"fold {fold} label {j} ignored its informative column"
            assert booster.num_feature() == f  # still takes the full table
    assert np.isfinite(result.oof).all() and result.test.shape == (50, len(LABELS))


def _fold_1_alone_has_epidural_positives() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    n, folds = 600, np.repeat([0, 1, 2], 200)
    x = rng.normal(size=(n, 8))
    y = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    y[:, 0] = 0.0
    y[folds == 1, 0] = (x[folds == 1, 0] > 1.0)  # epidural positives only in fold 1
    return x, y, folds


@pytest.mark.parametrize("early_stopping", [None, 5])
def test_a_fold_without_positives_of_a_label_predicts_its_smoothed_rate(early_stopping, monkeypatch) -> None:
    """Rare labels on small sets: where a fold's training rows hold no positive of a label, boosting
    would predict ~1e-15 for it (a held-out positive then costs ~34 nats, and the nested blend,
    whose weights come from the other folds, cannot know). That fold's booster for the label is a
    constant at the training rows' rate pulled off 0 by a half count; the other labels train as usual."""
    x, y, folds = _fold_1_alone_has_epidural_positives()
    trained = []
    real_train = lgbm._train

    def counting(params, data, *args, **kwargs):
        trained.append(data)
        return real_train(params, data, *args, **kwargs)

    monkeypatch.setattr(lgbm, "_train", counting)
    result = cross_validate(x, y, folds, x[:50], params={"num_threads": 1}, num_boost_round=20,
                            early_stopping_rounds=early_stopping, progress=False, keep_models=True)
    # No rounds spent on the label that has nothing to learn: 6 labels x 3 folds, less fold 1's epidural,
    # each trained once (twice with early stopping: the inner pair, then the refit).
    assert len(trained) == (17 * 2 if early_stopping else 17)
    for fold in (0, 2):  # fold 1 is among their training rows: they see positives
        train = folds != fold
        assert y[train, 0].sum() > 0
    train = folds != 1  # fold 1's model trained on folds 0 and 2: no epidural positive at all
    expected = 0.5 / (train.sum() + 1.0)
    np.testing.assert_allclose(result.oof[folds == 1, 0], expected, rtol=1e-6)
    booster, rounds = result.models[1][0]
    np.testing.assert_allclose(booster.predict(x[:50], num_iteration=rounds), expected, rtol=1e-6)
    assert result.oof[folds == 1, 0].min() > 1e-4  # not the ~1e-15 boosting gives
    assert np.ptp(result.oof[folds == 1, 1]) > 0  # the other labels still learn


@pytest.mark.parametrize("early_stopping", [None, 5])
def test_a_label_with_nothing_to_learn_bins_no_rows_of_its_own(early_stopping, monkeypatch) -> None:
    """With the features preselected per label every label bins its rows anew (no binning is
    shared), so the label a fold's booster cannot learn (one class) builds no Dataset there."""
    x, y, folds = _fold_1_alone_has_epidural_positives()
    binned = []
    real_dataset = lgbm._dataset

    def counting(xm, rows, target, names, params, keep, reuse, reference=None):
        binned.append(reuse is None)
        return real_dataset(xm, rows, target, names, params, keep, reuse, reference)

    monkeypatch.setattr(lgbm, "_dataset", counting)
    params = {**DEFAULT_PARAMS, "num_threads": 1, MAX_FEATURES: 4}
    cross_validate(x, y, folds, x[:50], params=params, num_boost_round=20, early_stopping_rounds=early_stopping,
                   progress=False)
    # 17 boosters learn (18 less fold 1's epidural); each bins its fit rows, with early stopping also
    # its inner rows and its refit rows.
    assert all(binned) and len(binned) == (17 * 3 if early_stopping else 17)
