"""The level-2 stacker: equal to sklearn's cross_val_predict on the same folds, better than every
level-1 input when neighbouring slices carry signal, strict about alignment, tunable with Optuna."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from lightgbm import LGBMClassifier
from sklearn.model_selection import PredefinedSplit, cross_val_predict

from competition.constants import LABELS
from competition.metric import weighted_log_loss
from competition.paths import WorkPaths
from features.tabular import TabularFeatureConfig
from level2_stacking.__main__ import main as stack_main
from level2_stacking.fitted import load_fitted
from level2_stacking.frame import StackFrameError, build_stack_frame
from level2_stacking.lgbm import DEFAULT_PARAMS, cross_validate
from level2_stacking.blend import any_at_least_subtypes, any_rule_gain, fit_simplex_weights, mix
from level2_stacking.synthetic import FabricatedModel, fabricate_competition, write_fabricated_data, write_fabricated_work
from level2_stacking.tune import load_best_params, open_study, patient_subsample, tune
from submissions.validate import validate_submission
from submissions.write import write_from_work

# One thread: on a busy 2-core box, OpenMP threads spinning against each other are 10x slower.
FAST = {**DEFAULT_PARAMS, "num_threads": 1, "learning_rate": 0.1, "min_data_in_leaf": 20}


def toy_table(n: int = 1200, n_features: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan  # missing neighbours are NaN in the real table
    logit = np.nan_to_num(x) @ rng.normal(size=(n_features, len(LABELS)))
    y = (rng.random((n, len(LABELS))) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    folds = rng.integers(0, 4, n)
    x_test = rng.normal(size=(300, n_features)).astype(np.float32)
    columns = [f"f{i}" for i in range(n_features)]
    return pd.DataFrame(x, columns=columns), y, folds, pd.DataFrame(x_test, columns=columns)


def test_cross_validation_equals_sklearn_cross_val_predict() -> None:
    x, y, folds, x_test = toy_table()
    rounds = 25
    ours = cross_validate(x, y, folds, x_test, params=FAST, num_boost_round=rounds, early_stopping_rounds=None, progress=False)
    ref_oof = np.column_stack([
        cross_val_predict(LGBMClassifier(n_estimators=rounds, **FAST), x, y[:, j], cv=PredefinedSplit(folds),
                          method="predict_proba")[:, 1]
        for j in range(len(LABELS))
    ])
    np.testing.assert_allclose(ours.oof, ref_oof, rtol=1e-10, atol=1e-12)
    ref_test = np.zeros((len(x_test), len(LABELS)))
    for f in np.unique(folds):
        for j in range(len(LABELS)):
            clf = LGBMClassifier(n_estimators=rounds, **FAST).fit(x[folds != f], y[folds != f, j])
            ref_test[:, j] += clf.predict_proba(x_test)[:, 1] / len(np.unique(folds))
    np.testing.assert_allclose(ours.test, ref_test, rtol=1e-10, atol=1e-12)
    assert ours.loss == pytest.approx(weighted_log_loss(y, ref_oof))
    assert (ours.best_iterations == rounds).all()

    # Test features per fold: fold k's booster predicts fold k's table only.
    per_fold = {int(f): x_test + 0.3 * int(f) for f in np.unique(folds)}
    ours = cross_validate(x, y, folds, per_fold, params=FAST, num_boost_round=rounds, early_stopping_rounds=None,
                          progress=False)
    ref_test = np.zeros((len(x_test), len(LABELS)))
    for f in np.unique(folds):
        for j in range(len(LABELS)):
            clf = LGBMClassifier(n_estimators=rounds, **FAST).fit(x[folds != f], y[folds != f, j])
            ref_test[:, j] += clf.predict_proba(per_fold[int(f)])[:, 1] / len(np.unique(folds))
    np.testing.assert_allclose(ours.test, ref_test, rtol=1e-10, atol=1e-12)


def test_held_out_labels_never_choose_their_own_rounds() -> None:
    """Early stopping watches an inner training fold: flipping the held-out fold's labels cannot
    change its own predictions (it did when early stopping watched the held-out fold)."""
    x, y, folds, _ = toy_table(seed=2)
    kw = dict(params=FAST, num_boost_round=300, early_stopping_rounds=10, progress=False)
    first = cross_validate(x, y, folds, **kw)
    flipped = y.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    second = cross_validate(x, flipped, folds, **kw)
    np.testing.assert_allclose(first.oof[folds == 0], second.oof[folds == 0])
    assert not np.allclose(first.oof[folds == 1], second.oof[folds == 1])
    no_refit = cross_validate(x, y, folds, refit=False, **kw)
    assert not np.allclose(no_refit.oof, first.oof)  # the refit on all training folds is a different model

def test_early_stopping_stops_and_on_fold_reports_running_loss() -> None:
    x, y, folds, _ = toy_table(seed=1)
    seen: list[tuple[int, float]] = []
    res = cross_validate(x, y, folds, params=FAST, num_boost_round=2000, early_stopping_rounds=10,
                         on_fold=lambda step, loss: seen.append((step, loss)), progress=False, refit=False)
    assert (res.best_iterations < 2000).all()
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert seen[-1][1] == pytest.approx(res.loss)


@pytest.fixture(scope="module")
def fabricated_work(tmp_path_factory) -> WorkPaths:
    root = tmp_path_factory.mktemp("fab")
    paths = WorkPaths.for_data(root / "rsna-fake", root / "work")
    comp = fabricate_competition(n_patients=60, n_test_patients=20, slices=(12, 28), seed=3)
    write_fabricated_work(paths, comp, {"cnn_a": 2.0, "cnn_b": 2.5}, seed=3)
    write_fabricated_data(root / "rsna-fake", comp)
    return paths


def test_stacker_beats_every_level1_input(fabricated_work: WorkPaths, capsys) -> None:
    paths = fabricated_work
    data = paths.root.parent / "rsna-fake"
    argv = ["--data", str(data), "--work", str(paths.root), "--threads", "1", "--neighbours", "2",
            "--rounds", "100", "--early-stopping", "20", "--no-progress"]
    assert stack_main(argv) == 0
    out = capsys.readouterr().out
    assert "mean of level 1" in out and "stacker" in out and "roc_auc" in out
    metrics = json.loads((paths.stack / "metrics.json").read_text())
    scores = {name: row["weighted"] for name, row in metrics["scores"].items()}
    print(scores)
    assert scores["stacker"] < min(scores["cnn_a"], scores["cnn_b"], scores["mean of level 1"])
    assert set(metrics["scores"]["stacker"]) == {"weighted", *LABELS}

    folds = pd.read_parquet(paths.folds)
    oof = pd.read_parquet(paths.stack / "oof.parquet")
    # The study-level figures recomputed by hand: the stack's study call is each study's largest
    # (nested) OOF `any`, saved in oof_studies.parquet; its threshold must be the highest one still
    # reaching 95 % sensitivity.
    meta = pd.read_parquet(paths.metadata).set_index("image_id")["study_id"]
    truth = pd.read_parquet(paths.labels).set_index("image_id")["any"].groupby(meta).max()
    score = oof.set_index("image_id")["any"].groupby(meta).max().loc[truth.index]
    saved = pd.read_parquet(paths.stack / "oof_studies.parquet").set_index("study_id")
    np.testing.assert_array_equal(saved["probability"].loc[truth.index], score)
    assert (saved["fold"] == oof.set_index("image_id")["fold"].groupby(meta).first().loc[saved.index]).all()
    study = metrics["study_level"]["stacker"]
    called = score >= study["threshold"]
    assert study["sensitivity"] == pytest.approx(called[truth == 1].mean())
    assert study["specificity"] == pytest.approx((~called[truth == 0]).mean())
    higher = score[(truth == 1) & (score > study["threshold"])]
    assert higher.empty or (score[truth == 1] >= higher.min()).mean() < 0.95
    assert oof["image_id"].tolist() == folds["image_id"].tolist() and (oof["fold"] == folds["fold"]).all()
    labels = pd.read_parquet(paths.labels).set_index("image_id").loc[oof["image_id"], list(LABELS)].to_numpy()
    assert weighted_log_loss(labels, oof[list(LABELS)].to_numpy()) == pytest.approx(scores["stacker"])
    test = pd.read_parquet(paths.stack / "test.parquet")
    level1_test = pd.read_parquet(paths.model_dir("cnn_a") / "test.parquet")
    assert sorted(test["image_id"]) == sorted(level1_test["image_id"])
    assert test[list(LABELS)].notna().all().all() and test[list(LABELS)].to_numpy().max() <= 1

    # DATA carries the test answers: held-out images, never seen by any fold, confirm it.
    test_scores = {name: row["weighted"] for name, row in metrics["test_scores"].items()}
    print(test_scores)
    assert test_scores["stacker"] < min(test_scores["cnn_a"], test_scores["cnn_b"], test_scores["mean of level 1"])
    assert "Test log loss against the answers" in out
    thresholds = {name: row["threshold"] for name, row in metrics["study_level"].items()}
    assert {name: row["threshold"] for name, row in metrics["test_study_level"].items()} == thresholds

    # The stacker's test predictions make a valid submission.
    written = write_from_work(data, paths.root, None, paths.root / "subs")
    assert written.name == "rsna-fake-stack.csv.gz"
    assert validate_submission(written, data / "stage_2_sample_submission.csv") == len(test) * len(LABELS)


def test_a_cache_without_brain_ratios_is_gone_without_in_one_line(fabricated_work, capsys) -> None:
    """An image cache built before brain ratios were stored (here: none at all) must neither stop
    level 2 nor be rebuilt: the brain features are left out, the fitted config says so, one line tells."""
    frame = build_stack_frame(fabricated_work, None, TabularFeatureConfig(k_neighbours=1, brain_ratio=True))
    notes = [line for line in capsys.readouterr().out.splitlines() if "brain" in line]
    assert len(notes) == 1 and "goes on without the brain_ratio features" in notes[0]
    assert not frame.config.brain_ratio and "brain_ratio" not in frame.x_train.columns
    assert not fabricated_work.cache.exists()


def test_any_shifts_from_the_command_line_reach_the_fitted_stack(fabricated_work, tmp_path, capsys) -> None:
    """--any-shifts builds the far `any` neighbours, and metrics.json and the fitted stack (which
    `make predict` rebuilds the features from) record them."""
    paths = _copy_work(fabricated_work, tmp_path / "work")
    data = fabricated_work.root.parent / "rsna-fake"
    argv = ["--data", str(data), "--work", str(paths.root), "--threads", "1", "--neighbours", "2", "--stacker", "lgbm",
            "--rounds", "30", "--early-stopping", "0", "--no-progress"]
    assert stack_main([*argv, "--any-shifts", "6,9"]) == 0
    metrics = json.loads((paths.stack / "metrics.json").read_text())
    assert metrics["feature_config"]["any_shifts"] == [6, 9]
    fitted = load_fitted(paths.stack)
    assert fitted.feature_config == TabularFeatureConfig(k_neighbours=2, any_shifts=(6, 9))
    assert {"cnn_a__any__prev9", "cnn_b__any__next6"} <= set(fitted.feature_names)
    assert metrics["n_features"] == len(fitted.feature_names)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # not a number
        stack_main([*argv, "--any-shifts", "2,x"])
    assert "--any-shifts takes comma-separated whole slice offsets" in capsys.readouterr().err
    # An offset within --neighbours: refused before anything is read, in one line.
    with pytest.raises(ValueError, match=r"any_shifts must be distinct offsets beyond k_neighbours=2, got \(2, 10\)"):
        stack_main([*argv, "--any-shifts", "2,10"])


def _copy_work(src: WorkPaths, dst: Path) -> WorkPaths:
    import shutil

    shutil.copytree(src.root, dst)
    return WorkPaths(dst)


def _rewrite(paths: WorkPaths, model: str, name: str, change) -> None:
    path = paths.model_dir(model) / name
    change(pd.read_parquet(path)).to_parquet(path, index=False)


@pytest.mark.parametrize(
    "model_file, change, message",
    [
        ("oof.parquet", lambda t: t.iloc[1:], r"cnn_b/oof.parquet vs the folds table: 1 image\(s\) missing"),
        ("oof.parquet", lambda t: pd.concat([t, t.iloc[:1]]), r"cnn_b/oof.parquet vs the folds table: duplicated image_id"),
        ("oof.parquet", lambda t: t.assign(fold=(t["fold"] + 1) % 5), r"cnn_b: OOF folds differ from the folds table"),
        ("test.parquet", lambda t: t.iloc[:-1], r"cnn_b/test.parquet vs cnn_a/test.parquet: 1 image\(s\) missing"),
        ("test.parquet", lambda t: pd.concat([t, t.iloc[:1].assign(image_id="ID_extra")]), r"1 unexpected image"),
        ("oof.parquet", lambda t: t.assign(any=t["any"].where(t.index != 5, np.nan)), r"outside \[0, 1\] or NaN"),
    ],
    ids=["oof_missing", "oof_duplicate", "oof_other_folds", "test_missing", "test_extra", "nan"],
)
def test_frame_refuses_misaligned_level1_outputs(fabricated_work, tmp_path, model_file, change, message) -> None:
    paths = _copy_work(fabricated_work, tmp_path / "w")
    _rewrite(paths, "cnn_b", model_file, change)
    with pytest.raises(StackFrameError, match=message):
        build_stack_frame(paths, ["cnn_a", "cnn_b"], TabularFeatureConfig(k_neighbours=1, rolling_windows=(3,)))


def test_frame_model_choice_and_leaky_folds(fabricated_work, tmp_path) -> None:
    paths = _copy_work(fabricated_work, tmp_path / "w")
    cfg = TabularFeatureConfig(k_neighbours=1, rolling_windows=(3,))
    assert build_stack_frame(paths, ["cnn_b"], cfg).models == ["cnn_b"]
    assert build_stack_frame(paths, None, cfg).models == ["cnn_a", "cnn_b"]
    with pytest.raises(StackFrameError, match=r"\['nope'\] have no oof.parquet"):
        build_stack_frame(paths, ["cnn_a", "nope"], cfg)
    # Image-level (not patient-level) folds would leak through neighbour features.
    folds = pd.read_parquet(paths.folds)
    folds["fold"] = np.arange(len(folds)) % 5
    folds.to_parquet(paths.folds, index=False)
    with pytest.raises(StackFrameError, match="spans several folds"):
        build_stack_frame(paths, None, cfg)
    with pytest.raises(StackFrameError, match="no level-1 model outputs"):
        build_stack_frame(WorkPaths(tmp_path / "empty"), None, cfg)


def test_optuna_study_resumes_and_its_best_params_are_used(tmp_path, capsys) -> None:
    paths = WorkPaths.for_data("rsna-fake", tmp_path / "w")
    comp = fabricate_competition(n_patients=30, n_test_patients=5, slices=(8, 14), n_folds=3, seed=5)
    write_fabricated_work(paths, comp, {"cnn_a": 2.0, "cnn_b": 2.5}, seed=5)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    frame = build_stack_frame(paths, None, TabularFeatureConfig(k_neighbours=1, rolling_windows=(3,)))
    x, y, folds = frame.x_train.iloc[:, :40], frame.y, frame.folds
    kw = dict(storage=storage, name="t", num_threads=1, num_boost_round=20, early_stopping_rounds=5, progress=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params, loss, study = tune(x, y, folds, trials=2, **kw)
    assert len(study.trials) == 2
    first = study.trials[0]
    assert first.params["num_leaves"] == DEFAULT_PARAMS["num_leaves"]  # the defaults are trial 0
    assert sorted(first.intermediate_values) == list(range(3))  # one report per fold: pruning can act
    params, loss, study = tune(x, y, folds, trials=3, **kw)  # resumes: one more trial, not three
    assert len(open_study(storage, "t").trials) == 3
    assert loss == pytest.approx(min(t.value for t in study.trials if t.value is not None))

    # The CLI: --tune writes best_params.json (sqlite in the stack folder by default) ...
    base = ["--data", "rsna-fake", "--work", str(paths.root), "--threads", "1", "--neighbours", "1",
            "--rounds", "20", "--early-stopping", "5", "--no-progress"]
    assert stack_main([*base, "--tune", "--trials", "2"]) == 0
    assert (paths.stack / "optuna.db").is_file()
    saved = load_best_params(paths.stack / "best_params.json")
    assert saved["models"] == ["cnn_a", "cnn_b"] and saved["finished_trials"] == 2
    # ... which the next plain run uses.
    capsys.readouterr()
    assert stack_main(base) == 0
    assert "parameters: tuned (best_params.json)" in capsys.readouterr().out
    used = json.loads((paths.stack / "metrics.json").read_text())["params"]
    assert used["num_leaves"] == saved["params"]["num_leaves"]
    assert used["learning_rate"] == pytest.approx(saved["params"]["learning_rate"])


def test_per_fold_test_features_catch_the_mean_of_the_fold_models(tmp_path, capsys) -> None:
    """Booster k learnt on one fold model's predictions; applied to the mean of the fold models
    (smoother: lower maxima, fewer slices above a threshold) it mispredicts test. The fabricated
    fold models differ, as real ones do; dropping their fold<k>/test.parquet brings back the old
    behaviour, which must score worse on test."""
    paths = WorkPaths(tmp_path / "w")
    comp = fabricate_competition(n_patients=80, n_test_patients=40, slices=(12, 28), seed=21)
    write_fabricated_work(paths, comp, {"cnn_a": FabricatedModel(2.5, shared=0.2), "cnn_b": FabricatedModel(3.0, shared=0.2)},
                          seed=21)
    cfg = TabularFeatureConfig(k_neighbours=2, rolling_windows=(3,))
    frame = build_stack_frame(paths, None, cfg)
    assert frame.test_per_fold and not frame.x_test[0].equals(frame.x_test[1])
    y_test = comp.labels.set_index("image_id").loc[frame.test_ids, list(LABELS)].to_numpy(float)
    kw = dict(params=FAST, num_boost_round=200, early_stopping_rounds=20, progress=False)
    per_fold = cross_validate(frame.x_train, frame.y, frame.folds, frame.x_test, **kw)
    for k in np.unique(frame.folds):
        (paths.model_dir("cnn_a") / f"fold{k}" / "test.parquet").unlink()
    old = build_stack_frame(paths, None, cfg)
    assert "cnn_a lack fold<k>/test.parquet" in capsys.readouterr().out and not old.test_per_fold
    on_mean = cross_validate(old.x_train, old.y, old.folds, old.x_test, **kw)
    np.testing.assert_allclose(per_fold.oof, on_mean.oof)  # training is the same; only test features differ
    new_loss, old_loss = weighted_log_loss(y_test, per_fold.test), weighted_log_loss(y_test, on_mean.test)
    print(f"test loss: per fold {new_loss:.4f}, on the mean {old_loss:.4f}")
    assert new_loss < 0.95 * old_loss


def test_blend_weights_and_the_any_rule() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random((2000, len(LABELS))) < 0.2).astype(float)
    good = np.clip(0.7 * y + 0.15 + rng.normal(0, 0.05, y.shape), 0.01, 0.99)
    noise = rng.random(y.shape)
    weights = fit_simplex_weights(y, np.stack([good, noise]))
    assert (weights[0] >= 0.8).all()
    assert weighted_log_loss(y, mix(np.stack([good, noise]), weights)) <= weighted_log_loss(y, good) + 1e-12
    p = np.full((1, len(LABELS)), 0.1)
    p[0, 2] = 0.8
    assert any_at_least_subtypes(p)[0, -1] == 0.8 and p[0, -1] == 0.1  # a copy; `any` raised to the subtype
    y_any = np.zeros((1, len(LABELS)))
    y_any[0, [2, -1]] = 1
    assert any_rule_gain(y_any, p) > 0 and any_rule_gain(np.zeros_like(p), p) < 0


def test_tuning_subsample_takes_whole_patients() -> None:
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(1000)], "patient_id": [f"p{i // 4}" for i in range(1000)]})
    rows = patient_subsample(meta["image_id"].to_numpy(), meta, share=0.2, min_patients=10)
    chosen = meta.loc[rows, "patient_id"]
    assert chosen.nunique() == 50 and rows.sum() == 200
    assert patient_subsample(meta["image_id"].to_numpy(), meta, share=0.2, min_patients=400).all()


@pytest.mark.slow
@pytest.mark.parametrize("seed, noise, shared, shift, emb", [
    (101, (2.0, 2.5, 3.0), 0.5, 0.0, 16),
    (202, (3.0, 3.5), 0.3, 0.3, 8),      # a shift of the test distribution
    (303, (2.5, 2.5, 4.0), 0.7, -0.2, 0),  # no embeddings (folders from before level 1 wrote them)
])
def test_stack_beats_its_best_input_on_unseen_synthetic_competitions(tmp_path, capsys, seed, noise, shared, shift, emb) -> None:
    """Seeds and difficulty knobs not used while building the stack: the blended stack's test loss
    beats its best level-1 input's and the constant prior's."""
    comp = fabricate_competition(n_patients=80, n_test_patients=30, slices=(14, 36), positive_rate=0.3, seed=seed)
    paths = WorkPaths(tmp_path / "w")
    models = {f"m{i}": FabricatedModel(sd, shared=shared, test_shift=shift, embedding_dim=emb) for i, sd in enumerate(noise)}
    write_fabricated_work(paths, comp, models, seed=seed)
    data = write_fabricated_data(tmp_path / "d", comp)
    assert stack_main(["--data", str(data), "--work", str(paths.root), "--threads", "1", "--no-progress",
                       "--embedding-dim", "8"]) == 0
    metrics = json.loads((paths.stack / "metrics.json").read_text())
    test = {name: row["weighted"] for name, row in metrics["test_scores"].items()}
    y_train = pd.read_parquet(paths.labels)[list(LABELS)].to_numpy(float)
    y_test = comp.labels.set_index("image_id").loc[pd.read_parquet(paths.stack / "test.parquet")["image_id"], list(LABELS)]
    prior = weighted_log_loss(y_test.to_numpy(float), np.broadcast_to(y_train.mean(axis=0), y_test.shape))
    best = min(test[m] for m in models)
    with capsys.disabled():
        print(f"\nseed {seed}: test wLL stack {test['stacker']:.4f} (lightgbm {test['lightgbm']:.4f}, sequence "
              f"{test['sequence model']:.4f}, blend {test['blend']:.4f}); best level 1 {best:.4f}; prior {prior:.4f}")
    assert test["stacker"] < best and test["stacker"] < prior
