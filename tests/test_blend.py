"""The blend over candidates and the study call: the simplex fit against a brute-force grid and
sklearn's log loss, nested choices blind to the held-out fold's labels, and a blend that falls back
on one strong input."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from competition.constants import LABELS
from competition.metric import weighted_log_loss
from level2_stacking import blend
from level2_stacking.blend import FORMS, fit_form, fit_simplex_weights, mix, nested_blend
from level2_stacking.study_model import nested_study


def _labels(rng, n: int) -> np.ndarray:
    return (rng.random((n, len(LABELS))) < 0.25).astype(float)


def _noisy(rng, y: np.ndarray, sd: float) -> np.ndarray:
    """Probabilities of a model with logit = truth (+/-2) plus noise of sd ``sd``."""
    return 1 / (1 + np.exp(-(4 * y - 2 + rng.normal(0, sd, y.shape))))


def _simplex_grid(n_cand: int, step: float = 0.01) -> np.ndarray:
    ticks = np.round(np.arange(0, 1 + step / 2, step), 6)
    points = [w for w in itertools.product(ticks, repeat=n_cand - 1) if sum(w) <= 1 + 1e-9]
    return np.array([[*w, max(0.0, 1 - sum(w))] for w in points])


@pytest.mark.parametrize("sds", [(1.0, 1.5), (1.0, 1.5, 3.0), (0.5, 4.0, 4.0)])
def test_weights_match_a_brute_force_grid(sds) -> None:
    rng = np.random.default_rng(len(sds) * 7 + int(sds[0] * 10))
    y = _labels(rng, 1500)
    candidates = np.stack([_noisy(rng, y, sd) for sd in sds])
    weights = fit_simplex_weights(y, candidates)
    assert weights.shape == (len(sds), len(LABELS))
    assert (weights >= 0).all() and np.allclose(weights.sum(axis=0), 1)
    grid = _simplex_grid(len(sds), 0.01 if len(sds) == 2 else 0.02)
    for j in range(len(LABELS)):
        mixes = np.clip(grid @ candidates[:, :, j], 1e-7, 1 - 1e-7)  # (grid points, rows)
        grid_losses = -(y[:, j] * np.log(mixes) + (1 - y[:, j]) * np.log1p(-mixes)).mean(axis=1)
        best = np.argmin(grid_losses)
        assert grid_losses[best] == pytest.approx(log_loss(y[:, j], mixes[best], labels=[0, 1]), rel=1e-9)
        fitted = log_loss(y[:, j], np.clip(weights[:, j] @ candidates[:, :, j], 1e-7, 1 - 1e-7), labels=[0, 1])
        assert fitted <= grid_losses[best] + 1e-9  # never worse than the best grid point
        assert np.abs(weights[:, j] - grid[best]).max() <= 0.05  # and near it


def _nested_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = _labels(rng, 1200)
    folds = np.repeat(np.arange(4), 300)
    candidates = np.stack([_noisy(rng, y, sd) for sd in (1.2, 1.6, 2.5)])
    return y, folds, candidates


def test_fold_k_predictions_ignore_fold_k_labels() -> None:
    y, folds, candidates = _nested_inputs()
    names = ["a", "b", "c"]
    before = nested_blend(names, y, folds, candidates)
    for k in range(4):
        flipped = y.copy()
        flipped[folds == k] = 1 - flipped[folds == k]
        after = nested_blend(names, flipped, folds, candidates)
        held = folds == k
        np.testing.assert_array_equal(after.oof[held], before.oof[held])
        np.testing.assert_array_equal(after.by_fold[k].weights, before.by_fold[k].weights)
        assert not np.array_equal(after.oof[~held], before.oof[~held])  # the other folds did see them
    # Each fold's prediction is its own weights' mix; the final weights are fitted on every row.
    held = folds == 2
    np.testing.assert_allclose(before.oof_blend[held], mix(candidates[:, held], before.by_fold[2].weights))
    np.testing.assert_allclose(before.final.weights, fit_form(before.final.form, y, candidates))


def test_the_blend_falls_back_on_one_strong_input() -> None:
    """LightGBM and the sequence model (here: weak, correlated stand-ins) are much worse than one
    level-1 model: the nested blend's OOF loss is within noise of that model's."""
    rng = np.random.default_rng(3)
    y = _labels(rng, 3000)
    folds = rng.integers(0, 5, len(y))
    shared = rng.normal(0, 1.5, y.shape)
    lgbm, seq = (1 / (1 + np.exp(-(2 * y - 1 + shared + rng.normal(0, 1, y.shape)))) for _ in range(2))
    strong, weak = _noisy(rng, y, 0.8), _noisy(rng, y, 3.0)
    candidates = np.stack([lgbm, seq, strong, weak, (strong + weak) / 2])
    nested = nested_blend(["lightgbm", "sequence model", "strong", "weak", "mean"], y, folds, candidates)

    def per_row(p: np.ndarray) -> np.ndarray:  # weighted log loss per row, `any` counting twice
        q = np.clip(p, 1e-7, 1 - 1e-7)
        loss = -(y * np.log(q) + (1 - y) * np.log(1 - q))
        return (loss[:, :5].sum(1) + 2 * loss[:, 5]) / 7

    delta = per_row(nested.oof) - per_row(strong)
    noise = 2 * delta.std() / np.sqrt(len(delta))
    print(f"nested blend {per_row(nested.oof).mean():.4f}, strong input {per_row(strong).mean():.4f}, "
          f"lightgbm {per_row(lgbm).mean():.4f}; noise {noise:.4f}")
    assert delta.mean() <= noise + 1e-9
    assert per_row(nested.oof).mean() < per_row(lgbm).mean() - 0.1
    assert (nested.final.weights[2] > 0.5).all()  # the strong input carries the blend


def _fold_varying_inputs(seed: int):
    """1,400 rows in 5 folds (a 50-patient set): one steady input, a weaker near-copy of it, and a
    "LightGBM" whose quality changes by fold and label (sharp on most, useless on some): per-label
    weights fitted on four folds trust it where it was sharp there, and fold five pays."""
    rng = np.random.default_rng(seed)
    n = 1400
    folds = np.repeat(np.arange(5), n // 5)
    y = (rng.random((n, len(LABELS))) < np.array([0.03, 0.08, 0.06, 0.08, 0.1, 0.25])).astype(float)

    def model(sd) -> np.ndarray:
        return 1 / (1 + np.exp(-(4 * y - 3 + rng.normal(0, 1, y.shape) * sd)))

    lgbm = model(np.where(rng.random((5, 1, len(LABELS))) < 0.6, 1.5, 5.0)[folds, 0])
    strong = model(2.2)
    return y, folds, np.stack([lgbm, model(2.6), strong, (strong + model(2.6)) / 2]), strong


def test_the_form_chosen_by_cross_validation_beats_per_label_weights_on_a_small_set() -> None:
    """Fold-varying LightGBM on 1,400 rows: the nested blend with its form chosen ("auto") beats both
    the per-label blend (the default) and its steady input, on average over sets. (On real tiny-CNN
    outputs it did not: README.)"""
    chosen, per_label, steady = [], [], []
    for seed in range(4):
        y, folds, candidates, strong = _fold_varying_inputs(seed)
        names = ["lightgbm", "sequence model", "strong", "mean"]
        nested = nested_blend(names, y, folds, candidates, "auto")
        assert {c.form for c in nested.by_fold.values()} <= set(FORMS) and nested.final.form_losses
        chosen.append(weighted_log_loss(y, nested.oof_blend))
        steady.append(weighted_log_loss(y, strong))
        plain = nested_blend(names, y, folds, candidates)  # the default form
        assert {c.form for c in plain.by_fold.values()} == {"per label"} and not plain.final.form_losses
        per_label.append(weighted_log_loss(y, plain.oof_blend))
    print(f"nested OOF: form chosen {np.round(chosen, 4)}, per label {np.round(per_label, 4)}, "
          f"steady input {np.round(steady, 4)}")
    assert np.mean(chosen) < np.mean(per_label) - 0.01
    assert max(np.subtract(chosen, steady)) < 0


def test_auto_is_per_label_on_large_sets_and_an_unknown_form_is_refused(monkeypatch) -> None:
    y, folds, candidates = _nested_inputs()
    monkeypatch.setattr(blend, "FORM_CV_ROWS", 600)  # fold k's training rows: 900
    nested = nested_blend(["a", "b", "c"], y, folds, candidates, "auto")
    assert [c.form for c in nested.by_fold.values()] == ["per label"] * 4 and not nested.final.form_losses
    np.testing.assert_array_equal(nested.final.weights, fit_simplex_weights(y, candidates))
    with pytest.raises(ValueError, match="unknown blend form 'mean'; one of best input, pooled, per label, auto"):
        nested_blend(["a", "b", "c"], y, folds, candidates, "mean")


def test_each_form_against_a_reference_computed_another_way() -> None:
    y, folds, candidates, _ = _fold_varying_inputs(1)
    c = candidates[:2]  # two candidates: a grid over the one free weight is exhaustive
    grid = np.linspace(0, 1, 1001)

    def pooled_loss(a: float) -> float:  # every label's rows as one binary problem
        q = np.clip(a * c[0] + (1 - a) * c[1], 1e-15, 1 - 1e-15)
        return float(-(y * np.log(q) + (1 - y) * np.log1p(-q)).mean())

    a = grid[np.argmin([pooled_loss(g) for g in grid])]
    pooled = fit_form("pooled", y, c)
    assert np.allclose(pooled, pooled[:, :1]) and abs(pooled[0, 0] - a) <= 0.002
    best = fit_form("best input", y, c)
    assert best[:, 0].tolist() == ([1.0, 0.0] if weighted_log_loss(y, c[0]) < weighted_log_loss(y, c[1]) else [0.0, 1.0])
    np.testing.assert_array_equal(fit_form("per label", y, c), fit_simplex_weights(y, c))
    with pytest.raises(ValueError, match="unknown blend form 'median'"):
        fit_form("median", y, c)
    # The form's cross-validated loss, recomputed by a plain loop over the folds.
    form, losses = blend.choose_form(y, folds, c)
    for name in FORMS:
        p = np.zeros(y.shape)
        for k in range(5):
            p[folds == k] = mix(c[:, folds == k], fit_form(name, y[folds != k], c[:, folds != k]))
        assert losses[name] == pytest.approx(weighted_log_loss(y, p), rel=1e-12)
    assert losses[form] == min(losses.values())


def _study_inputs(seed: int):
    """120 studies of 10 slices; candidate 1 ranks studies best at the study level."""
    rng = np.random.default_rng(seed)
    n_studies, per = 120, 10
    study = np.repeat(np.arange(n_studies), per).astype(str)
    bleed = rng.random(n_studies) < 0.4
    y = np.zeros((n_studies * per, len(LABELS)))
    y[:, -1] = np.repeat(bleed, per) & (rng.random(n_studies * per) < 0.4)
    y[:, -1] = np.maximum(y[:, -1], np.repeat(bleed, per) * (np.arange(n_studies * per) % per == 0))
    candidates = np.stack([_noisy(rng, y, sd) for sd in (5.0, 3.0, 5.0)])
    folds = np.repeat(rng.integers(0, 4, n_studies), per)
    return y, folds, candidates, study


def test_the_study_call_is_the_nested_blends_max_and_ranks_like_the_best_input() -> None:
    y, folds, candidates, study = _study_inputs(5)
    names = ["a", "b", "c"]
    blended = nested_blend(names, y, folds, candidates)
    before = nested_study(blended.oof[:, -1], y[:, -1], folds, study)
    # The reference: a loop over the studies in their sorted order.
    ids = sorted(set(study))
    assert before.study_ids.tolist() == ids
    for j, s in enumerate(ids):
        rows = study == s
        assert before.oof[j] == blended.oof[rows, -1].max() and before.truth[j] == y[rows, -1].max()
        assert before.folds[j] == folds[rows][0]
    maxima = candidates[:, :, -1].reshape(3, -1, 10).max(axis=2)  # studies are consecutive runs of 10 slices
    best_input = max(roc_auc_score(y[:, -1].reshape(-1, 10).max(axis=1), m) for m in maxima)
    nested_auc = roc_auc_score(before.truth, before.oof)
    print(f"study AUC: nested stack max {nested_auc:.4f}, best input {best_input:.4f}")
    assert nested_auc >= best_input - 0.02
    for k in range(4):  # fold k's study scores do not move when fold k's labels are flipped
        flipped = y.copy()
        flipped[folds == k] = 1 - flipped[folds == k]
        after = nested_study(nested_blend(names, flipped, folds, candidates).oof[:, -1], flipped[:, -1], folds, study)
        held = before.folds == k
        np.testing.assert_array_equal(after.oof[held], before.oof[held])
        assert not np.array_equal(after.oof[~held], before.oof[~held])


def test_a_study_split_over_folds_is_refused() -> None:
    y, folds, candidates, study = _study_inputs(1)
    folds = folds.copy()
    folds[0] = (folds[0] + 1) % 4
    with pytest.raises(ValueError, match="several folds"):
        nested_study(candidates[0, :, -1], y[:, -1], folds, study)


def test_optuna_tuning_patients_are_scored_apart() -> None:
    from level2_stacking.pipeline import _headline

    rows, notes = _headline(None, 5)
    assert rows.all() and "nested" in notes[0]
    tuned = np.array([True, False, False, True, False])
    rows, notes = _headline(tuned, 5)
    np.testing.assert_array_equal(rows, ~tuned)
    assert "3 rows of the patients Optuna never saw" in notes[-1]
    rows, notes = _headline(np.ones(5, bool), 5)
    assert rows.all() and "tuned on themselves" in notes[-1]


def test_a_label_without_positives_borrows_the_pooled_weights() -> None:
    """Fit where one label has no positive row, the lowest predictor would win that label; it takes
    the weights fitted on the other labels pooled instead."""
    rng = np.random.default_rng(9)
    y = _labels(rng, 1500)
    y[:, 1] = 0
    candidates = np.stack([_noisy(rng, y, sd) for sd in (1.0, 2.0)])
    candidates[1, :, 1] = 1e-6  # candidate 1 "knows" label 1 never fires here
    weights = fit_simplex_weights(y, candidates)
    others = [0, 2, 3, 4, 5]
    pooled = fit_simplex_weights(y[:, others].T.reshape(-1, 1), candidates[:, :, others].transpose(0, 2, 1).reshape(2, -1, 1))
    np.testing.assert_allclose(weights[:, 1], pooled[:, 0])
    assert weights[0, 1] > 0.5  # the better candidate, not the one predicting zeros


# Three level-1 models' probabilities of one label on 18 rows, saturating at exactly 0 and 1 (a
# confident model's rounded outputs): there the clipped log loss is flat, and SLSQP from the uniform
# mix stops at an interior mix (0.0361) worse than the third candidate alone (0.0349).
SHORT_Y = np.array([1.0] * 11 + [0.0] + [1.0] * 5 + [0.0])
SHORT_P = np.array([
    [0.9457, 0.8085, 1.0, 0.9424, 1.0, 0.9531, 1.0, 0.8851, 0.8667, 0.9255, 1.0, 0.0, 1.0, 0.9441, 1.0, 0.963, 0.9915, 0.0],
    [0.8986, 0.9926, 1.0, 1.0, 0.9791, 1.0, 0.952, 0.9212, 1.0, 0.9669, 1.0, 0.1089, 0.8491, 0.9594, 1.0, 0.9715, 0.9501,
     0.0399],
    [0.9619, 0.873, 1.0, 0.9585, 0.9427, 1.0, 0.9493, 1.0, 1.0, 1.0, 0.8851, 0.0261, 1.0, 1.0, 0.8596, 1.0, 1.0, 0.0],
])


def test_fit_simplex_is_never_worse_than_a_single_candidate() -> None:
    """Where the optimiser stops short of a vertex, fit_simplex must still return one at least as good."""
    from scipy.optimize import minimize

    from level2_stacking.blend import fit_simplex

    def loss(w: np.ndarray) -> float:
        return log_loss(SHORT_Y, np.clip(w @ SHORT_P, 1e-15, 1 - 1e-15), labels=[0, 1])

    vertices = [loss(v) for v in np.eye(3)]
    slsqp = minimize(lambda w: loss(np.clip(w, 0, 1)), np.full(3, 1 / 3), method="SLSQP", bounds=[(0, 1)] * 3,
                     constraints=({"type": "eq", "fun": lambda w: w.sum() - 1},), options={"ftol": 1e-12, "maxiter": 500})
    assert slsqp.fun > min(vertices) + 1e-3, "the case no longer makes SLSQP stop short; find another"
    w = fit_simplex(SHORT_Y, SHORT_P)
    assert (w >= 0).all() and w.sum() == pytest.approx(1)
    assert loss(w) <= min(vertices) + 1e-12


def test_the_blend_form_option_reaches_the_settings_and_a_wrong_one_is_refused(capsys) -> None:
    from level2_stacking.__main__ import parse_args
    from level2_stacking.pipeline import StackSettings

    assert parse_args(["--data", "d"]).blend_form == "per-label"
    assert parse_args(["--data", "d", "--blend-form", "best-input"]).blend_form == "best-input"
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--blend-form", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err
    assert StackSettings(blend_form="best input").blend_form == "best input"
    with pytest.raises(ValueError, match="unknown blend form 'median'"):
        StackSettings(blend_form="median")
