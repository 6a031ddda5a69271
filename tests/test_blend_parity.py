"""The blend over candidates through the whole stack: on a competition where LightGBM is crippled
(three rounds) the blend gives the sequence model and a level-1 model real weight; the stacker's
OOF is rebuilt fold by fold from the candidates on disk with weights chosen on the other folds;
the saved level 2 reproduces the test rows and the study model's test calls; and the study
threshold `make predict` uses is the one the report chose on the nested OOF."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from competition.constants import LABEL_WEIGHTS, LABELS
from competition.paths import WorkPaths
from level2_stacking.blend import choose_blend
from level2_stacking.fitted import load_fitted
from level2_stacking.pipeline import StackSettings
from level2_stacking.sequence import SequenceSettings
from level2_stacking.synthetic import FabricatedModel
from prediction.ensemble import oof_threshold
from prediction.outputs import study_table
from test_fitted_stack import fit_fabricated, level1_test_outputs

pytestmark = pytest.mark.slow  # one stack fit (~45 s on 1 thread)

CANDIDATES = ["lightgbm", "sequence model", "a", "b", "mean of level 1"]


@pytest.fixture(scope="module")
def stacked(tmp_path_factory) -> WorkPaths:
    settings = StackSettings(stacker="blend", num_threads=1, k_neighbours=2, num_boost_round=3, early_stopping_rounds=None,
                             params={"learning_rate": 0.02}, embedding_dim=6, progress=False,
                             sequence=SequenceSettings(hidden=16, layers=1, embedding_proj=8, epochs=8, threads=1))
    return fit_fabricated(tmp_path_factory.mktemp("blend"),
                          {"a": FabricatedModel(1.35, embedding_dim=12), "b": FabricatedModel(2.5)}, settings, seed=11)


def _oof(paths: WorkPaths, table_path) -> np.ndarray:
    ids = pd.read_parquet(paths.stack / "oof.parquet")["image_id"]
    return pd.read_parquet(table_path).set_index("image_id").loc[ids, list(LABELS)].to_numpy(np.float64)


def test_the_nested_oof_is_rebuilt_from_the_candidates(stacked) -> None:
    paths = stacked
    metrics = json.loads((paths.stack / "metrics.json").read_text())
    weights = pd.DataFrame(metrics["blend"]["weights"]).T.loc[CANDIDATES]
    print(weights.round(3))
    assert weights.loc["sequence model"].max() > 0.1 and weights.loc[["a", "b"]].to_numpy().max() > 0.1
    stack = pd.read_parquet(paths.stack / "oof.parquet")
    y = pd.read_parquet(paths.labels).set_index("image_id").loc[stack["image_id"], list(LABELS)].to_numpy(float)
    level1 = {m: _oof(paths, paths.model_dir(m) / "oof.parquet") for m in ("a", "b")}
    candidates = np.stack([_oof(paths, paths.stack / "lightgbm" / "oof.parquet"),
                           _oof(paths, paths.stack / "sequence" / "oof.parquet"),
                           level1["a"], level1["b"], (level1["a"] + level1["b"]) / 2])
    folds = stack["fold"].to_numpy()
    for k in np.unique(folds):
        held = folds == k
        choice = choose_blend(CANDIDATES, y[~held], candidates[:, ~held])
        np.testing.assert_allclose(stack.loc[held, list(LABELS)].to_numpy(), choice.apply(candidates[:, held])[1], atol=1e-6)
    assert "nested" in metrics["notes"][0] and metrics["in_sample_oof_weighted_log_loss"] > 0

    # Within noise of its best input out of fold (per-row paired differences, +2 standard errors).
    def per_row(p):
        q = np.clip(p, 1e-7, 1 - 1e-7)
        return (-(y * np.log(q) + (1 - y) * np.log1p(-q)) * LABEL_WEIGHTS).sum(1) / LABEL_WEIGHTS.sum()

    stack_rows = per_row(stack[list(LABELS)].to_numpy())
    best = min((per_row(c) for c in candidates), key=np.mean)
    delta = stack_rows - best
    assert delta.mean() <= 2 * delta.std() / np.sqrt(len(delta))


def test_the_saved_stack_reproduces_test_rows_and_study_calls(stacked) -> None:
    paths = stacked
    fitted = load_fitted(paths.stack)
    assert fitted.blend_names == CANDIDATES
    ids, per_fold, embeddings = level1_test_outputs(paths)
    metadata = pd.read_parquet(paths.metadata).set_index("image_id").loc[ids].reset_index()
    rows, studies = fitted.predict_with_studies(per_fold, metadata, embeddings)
    expected = pd.read_parquet(paths.stack / "test.parquet").set_index("image_id").loc[ids, list(LABELS)].to_numpy()
    np.testing.assert_allclose(rows, expected, atol=1e-5, rtol=0)
    saved = pd.read_parquet(paths.stack / "test_studies.parquet")
    assert studies["study_id"].tolist() == saved["study_id"].tolist()
    np.testing.assert_allclose(studies["probability"], saved["probability"], atol=1e-5, rtol=0)

    # `make predict`'s threshold is the report's, chosen on the stack's nested OOF study scores (the
    # same pooling as its study call: the max of `any` over a study's slices).
    metrics = json.loads((paths.stack / "metrics.json").read_text())
    threshold = oof_threshold(paths, ["a", "b"], metrics["target_sensitivity"], stacked=True)
    assert threshold["threshold"] == pytest.approx(metrics["study_level"]["stacker"]["threshold"])
    assert threshold["roc_auc"] == pytest.approx(metrics["study_level"]["stacker"]["roc_auc"])
    slices = metadata[["image_id", "study_id"]].assign(**{label: rows[:, j] for j, label in enumerate(LABELS)})
    table = study_table(slices, threshold).set_index("study_id").loc[studies["study_id"]]
    np.testing.assert_array_equal(table["any"], studies["probability"])
    decided = np.where(studies["probability"].to_numpy() >= threshold["threshold"], "bleed", "no bleed")
    assert table["decision"].tolist() == decided.tolist()
