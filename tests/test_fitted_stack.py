"""The level 2 that `make stack` saves: reloaded from disk and applied to the test images' per-fold
level-1 outputs, it gives the stack's own test predictions; applied to one series alone, the same
rows; and it refuses inputs it was not fit on."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from competition.constants import LABELS
from competition.paths import WorkPaths
from level2_stacking.fitted import FORMAT, FittedStackError, fitted_dir, load_fitted
from level2_stacking.pipeline import StackSettings, run_stack
from level2_stacking.sequence import SequenceSettings
from level2_stacking.synthetic import FabricatedModel, fabricate_competition, write_fabricated_work

SEQ = SequenceSettings(hidden=16, layers=1, embedding_proj=8, epochs=3, threads=1)


def fit_fabricated(root, models: dict, settings: StackSettings, seed: int) -> WorkPaths:
    """A stack fit on a small fabricated competition (40 + 12 patients) under ``root``."""
    paths = WorkPaths(root / "work")
    comp = fabricate_competition(n_patients=40, n_test_patients=12, slices=(10, 20), seed=seed)
    write_fabricated_work(paths, comp, models, seed=seed)
    run_stack(root / "rsna-fake", paths.root, settings)
    return paths


@pytest.fixture(scope="module")
def stacked(tmp_path_factory) -> WorkPaths:
    settings = StackSettings(stacker="blend", num_threads=1, k_neighbours=2, num_boost_round=60,
                             early_stopping_rounds=10, sequence=SEQ, embedding_dim=6, progress=False)
    return fit_fabricated(tmp_path_factory.mktemp("fitted"),
                          {"a": FabricatedModel(2.0, embedding_dim=12), "b": FabricatedModel(2.5)}, settings, seed=5)


def level1_test_outputs(paths: WorkPaths, models=("a", "b"), folds=range(5)):
    """Per model and fold: the fold model's test probabilities and embeddings, in one id order."""
    ids = None
    per_fold, embeddings = {}, {}
    for m in models:
        per_fold[m], embeddings[m] = {}, {}
        for k in folds:
            folder = paths.model_dir(m) / f"fold{k}"
            table = pd.read_parquet(folder / "test.parquet")
            ids = table["image_id"].sort_values().to_numpy() if ids is None else ids
            at = pd.Index(table["image_id"]).get_indexer(ids)
            per_fold[m][k] = table[list(LABELS)].to_numpy()[at]
            if (folder / "embeddings_test.npy").is_file():
                embeddings[m][k] = np.load(folder / "embeddings_test.npy")[at]
    return ids, per_fold, embeddings


def test_the_saved_stack_reproduces_its_test_predictions(stacked) -> None:
    paths = stacked
    manifest = json.loads((fitted_dir(paths.stack) / "manifest.json").read_text())
    assert manifest["stacker"] == "blend" and set(manifest["maps"]) == {"a"}  # b wrote no embeddings
    fitted = load_fitted(paths.stack)
    assert sorted(fitted.boosters) == sorted(fitted.sequence) == fitted.folds == [0, 1, 2, 3, 4]
    ids, per_fold, embeddings = level1_test_outputs(paths)
    metadata = pd.read_parquet(paths.metadata).set_index("image_id").loc[ids].reset_index()
    expected = pd.read_parquet(paths.stack / "test.parquet").set_index("image_id").loc[ids, list(LABELS)].to_numpy()
    got = fitted.predict(per_fold, metadata, embeddings)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # Each half of the blend on its own: both halves are really there and really differ.
    lgbm = pd.read_parquet(paths.stack / "lightgbm" / "test.parquet").set_index("image_id").loc[ids, list(LABELS)]
    np.testing.assert_allclose(fitted._boosters(per_fold, metadata), lgbm.to_numpy(), atol=1e-6, rtol=0)
    seq = pd.read_parquet(paths.stack / "sequence" / "test.parquet").set_index("image_id").loc[ids, list(LABELS)]
    np.testing.assert_allclose(fitted._sequence(per_fold, metadata, embeddings), seq.to_numpy(), atol=1e-5, rtol=0)
    assert np.abs(lgbm.to_numpy() - seq.to_numpy()).max() > 1e-3

    # One study alone, its rows shuffled: the same probabilities (features are per series and study).
    study = metadata["study_id"].iloc[0]
    rows = np.flatnonzero(metadata["study_id"].to_numpy() == study)[::-1]
    alone = fitted.predict({m: {k: p[rows] for k, p in f.items()} for m, f in per_fold.items()},
                           metadata.iloc[rows].reset_index(drop=True),
                           {m: {k: e[rows] for k, e in f.items()} for m, f in embeddings.items()})
    np.testing.assert_allclose(alone, expected[rows], atol=1e-5, rtol=0)


def test_inputs_the_stack_was_not_fit_on_are_refused(stacked, tmp_path) -> None:
    fitted = load_fitted(stacked.stack)
    ids, per_fold, embeddings = level1_test_outputs(stacked)
    metadata = pd.read_parquet(stacked.metadata).set_index("image_id").loc[ids].reset_index()
    with pytest.raises(FittedStackError, match=r"fit on models \['a', 'b'\], given \['a'\]"):
        fitted.predict({"a": per_fold["a"]}, metadata, embeddings)
    with pytest.raises(FittedStackError, match="fit on folds"):
        fitted.predict({m: {k: f[k] for k in (0, 1)} for m, f in per_fold.items()}, metadata, embeddings)
    with pytest.raises(FittedStackError, match=r"embeddings of \['a'\]"):
        fitted.predict(per_fold, metadata, {})
    with pytest.raises(FittedStackError, match="run `make stack` to fit and save it"):
        load_fitted(tmp_path)
    copy = tmp_path / "stack"
    shutil.copytree(stacked.stack / "fitted", copy / "fitted")
    manifest = copy / "fitted" / "manifest.json"
    text = manifest.read_text()
    assert f'"format": {FORMAT}' in text
    manifest.write_text(text.replace(f'"format": {FORMAT}', '"format": 99'))
    with pytest.raises(FittedStackError, match="another version"):
        load_fitted(copy)


def test_a_rerun_reuses_the_stack_until_an_input_changes(stacked, tmp_path, capsys) -> None:
    paths = WorkPaths(tmp_path / "work")
    shutil.copytree(stacked.root, paths.root)
    data = stacked.root.parent / "rsna-fake"
    settings = StackSettings(stacker="lgbm", num_threads=1, k_neighbours=2, num_boost_round=40,
                             early_stopping_rounds=10, progress=False)
    run_stack(data, paths.root, settings)
    first = (paths.stack / "test.parquet").read_bytes()
    capsys.readouterr()

    outcome = run_stack(data, paths.root, settings)
    assert "up to date" in capsys.readouterr().out
    assert (paths.stack / "test.parquet").read_bytes() == first
    assert outcome.scores.loc["stacker", "weighted"] == pytest.approx(
        json.loads((paths.stack / "metrics.json").read_text())["scores"]["stacker"]["weighted"])
    assert "stacker" in outcome.report()  # the summary printed after a reuse reads back from metrics.json

    # One fold model's test predictions change (same shape, same size on disk): the stack is fit again.
    path = paths.model_dir("a") / "fold2" / "test.parquet"
    table = pd.read_parquet(path)
    table[list(LABELS)] = table[list(LABELS)].to_numpy()[::-1]
    table.to_parquet(path, index=False)
    run_stack(data, paths.root, settings)
    assert "up to date" not in capsys.readouterr().out
    assert (paths.stack / "test.parquet").read_bytes() != first

    # Another setting: fit again; `refit` fits again regardless.
    run_stack(data, paths.root, StackSettings(**{**settings.__dict__, "k_neighbours": 1}))
    assert "up to date" not in capsys.readouterr().out
    run_stack(data, paths.root, StackSettings(**{**settings.__dict__, "k_neighbours": 1}), refit=True)
    assert "up to date" not in capsys.readouterr().out
    # The refit LightGBM-only stack (one neighbour) is what was saved: it reproduces its own test rows.
    fitted = load_fitted(paths.stack)
    assert fitted.stacker == "lgbm" and not fitted.sequence and fitted.feature_config.k_neighbours == 1
    ids, per_fold, embeddings = level1_test_outputs(paths)
    metadata = pd.read_parquet(paths.metadata).set_index("image_id").loc[ids].reset_index()
    expected = pd.read_parquet(paths.stack / "test.parquet").set_index("image_id").loc[ids, list(LABELS)]
    np.testing.assert_allclose(fitted.predict(per_fold, metadata, embeddings), expected.to_numpy(), atol=1e-6, rtol=0)
