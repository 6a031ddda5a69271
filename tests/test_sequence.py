"""The sequence model and its inputs: masking, reversal, embeddings from fold models that share no
feature space, honest folds, and a gain over level 1 on fabricated series."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from competition.metric import weighted_log_loss
from competition.paths import WorkPaths
from level2_stacking.embeddings import FoldEmbeddings, shared_space_maps
from level2_stacking.frame import build_stack_frame
from level2_stacking.sequence import SeriesModel, SequenceSettings, cross_validate_sequence, predict_series
from level2_stacking.sequence_data import build_sequence_inputs
from level2_stacking.synthetic import FabricatedModel, fabricate_competition, write_fabricated_work

FAST = SequenceSettings(hidden=16, layers=1, embedding_proj=8, epochs=8, threads=1)


@pytest.mark.parametrize("arch", ["gru", "transformer"])
def test_a_series_gives_the_same_output_alone_and_in_a_padded_batch(arch) -> None:
    torch.manual_seed(0)
    s = SequenceSettings(arch=arch, hidden=16, layers=2, embedding_proj=4)
    model = SeriesModel(n_models=2, embedding_dims=[5], s=s)
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would hide the sequence part
    data = np.random.default_rng(0).normal(size=(3 + 9 + 5, 12 + 1 + 5)).astype(np.float16)
    bounds = np.array([0, 3, 12, 17])
    together = predict_series(model, data, bounds, s, batch_series=3)
    alone = np.concatenate([predict_series(model, data[a:b], np.array([0, b - a]), s) for a, b in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    # The GRU reads in order, so the reversed pass differs; the transformer knows order only through
    # the position column (each slice keeps its true place), so reversal changes nothing for it.
    forward = predict_series(model, data, bounds, SequenceSettings(**{**s.__dict__, "reverse_tta": False}))
    assert np.allclose(forward, together, atol=1e-5) == (arch == "transformer")


def test_the_untrained_model_starts_at_the_mean_of_level_1() -> None:
    model = SeriesModel(n_models=2, embedding_dims=[], s=FAST)
    logits = np.array([[1.0] * 6 + [-1.0] * 6 + [0.5], [3.0] * 6 + [1.0] * 6 + [0.5]], np.float32)
    p = predict_series(model, logits, np.array([0, 2]), FAST)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-np.array([[0.0] * 6, [2.0] * 6]))), atol=1e-6)


def test_shared_space_maps_align_fold_models_with_rotated_features() -> None:
    rng = np.random.default_rng(1)
    latent_test, latent_oof = rng.normal(size=(400, 6)), rng.normal(size=(100, 6))
    mix = rng.normal(size=(6, 20))
    folds = {}
    for k in range(3):
        rotation, _ = np.linalg.qr(rng.normal(size=(20, 20)))
        emb = lambda z: (z @ mix @ rotation + rng.normal(0, 0.05, (len(z), 20))).astype(np.float16)  # noqa: E731
        folds[k] = FoldEmbeddings(emb(latent_oof), np.arange(100), emb(latent_test), np.arange(400))
    shuffled = np.random.default_rng(2).permutation(400)  # fold 2 writes its test rows in another order
    folds[2] = FoldEmbeddings(folds[2].oof, folds[2].oof_ids, np.asarray(folds[2].test)[shuffled], shuffled)
    maps = shared_space_maps(folds, dim=6)
    mapped = []
    for k, f in folds.items():
        out = np.empty((100, 6), np.float32)
        maps[k].apply(f.oof, out)
        mapped.append(out)
    for k in (1, 2):  # the same images through different fold models land on the same coordinates
        corr = [np.corrcoef(mapped[0][:, j], mapped[k][:, j])[0, 1] for j in range(6)]
        assert min(corr) > 0.98, corr
    raw = [np.corrcoef(folds[0].oof[:, j].astype(float), folds[1].oof[:, j].astype(float))[0, 1] for j in range(6)]
    assert max(np.abs(raw)) < 0.9  # unmapped, the fold models disagree


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    comp = fabricate_competition(n_patients=50, n_test_patients=15, slices=(10, 24), seed=11)
    paths = WorkPaths(root / "w")
    write_fabricated_work(paths, comp, {"a": FabricatedModel(2.0, embedding_dim=12),
                                        "b": FabricatedModel(2.5)}, seed=11)
    frame = build_stack_frame(paths)
    metadata = pd.read_parquet(paths.metadata)
    y_test = comp.labels.set_index("image_id").loc[frame.test_ids].to_numpy(float)
    return frame, metadata, y_test


def test_sequence_model_beats_level_1_out_of_fold_and_on_test(fabricated) -> None:
    frame, metadata, y_test = fabricated
    inputs = build_sequence_inputs(frame, metadata, embedding_dim=8)
    assert inputs.embedding_dims == [8] and "embeddings of a" in inputs.note and "b without" in inputs.note
    res = cross_validate_sequence(inputs, frame.y, frame.folds, FAST, progress=False)
    best_oof = min(weighted_log_loss(frame.y, p) for p in frame.level1_oof.values())
    best_test = min(weighted_log_loss(y_test, p) for p in frame.level1_test.values())
    print(res.loss, best_oof, weighted_log_loss(y_test, res.test), best_test)
    assert res.loss < best_oof and weighted_log_loss(y_test, res.test) < best_test


def test_held_out_labels_never_reach_their_own_predictions(fabricated) -> None:
    frame, metadata, _ = fabricated
    inputs = build_sequence_inputs(frame, metadata, use_embeddings=False)
    assert "probabilities alone" in inputs.note and inputs.embedding_dims == []
    s = SequenceSettings(hidden=8, layers=1, epochs=2, threads=1)
    first = cross_validate_sequence(inputs, frame.y, frame.folds, s, progress=False)
    y = frame.y.copy()
    y[frame.folds == 0] = 1 - y[frame.folds == 0]  # fold 0's labels flipped: only the other folds may move
    second = cross_validate_sequence(inputs, y, frame.folds, s, progress=False)
    np.testing.assert_allclose(first.oof[frame.folds == 0], second.oof[frame.folds == 0], atol=1e-6)
    assert not np.allclose(first.oof[frame.folds == 1], second.oof[frame.folds == 1], atol=1e-3)


def test_embeddings_without_a_matching_table_are_refused(fabricated, tmp_path) -> None:
    import shutil

    frame, metadata, _ = fabricated
    folder = tmp_path / "a"
    shutil.copytree(frame.model_dirs["a"], folder)
    np.save(folder / "fold0" / "embeddings_oof.npy", np.zeros((3, 12), np.float16))
    bad = frame.__class__(**{**frame.__dict__, "model_dirs": {**frame.model_dirs, "a": folder}})
    with pytest.raises(ValueError, match=r"fold0/embeddings_oof.npy: shape \(3, 12\) does not match"):
        build_sequence_inputs(bad, metadata)


def test_low_rank_embeddings_map_to_finite_float16() -> None:
    """Small CNNs' pooled features span few directions; whitening the (numerically) empty ones
    used to overflow float16 into inf and NaN."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 32))
    folds = {}
    for k in (0, 1):
        test = (rng.normal(size=(200, 3)) @ basis + 1e-6 * rng.normal(size=(200, 32))).astype(np.float16)
        oof = (rng.normal(size=(50, 3)) @ basis).astype(np.float16)
        folds[k] = FoldEmbeddings(oof, np.arange(50), test, np.arange(200))
    maps = shared_space_maps(folds, dim=16)
    for k, emb in folds.items():
        assert maps[k].weight.shape[1] <= 4  # the three real directions (and maybe float16's noise)
        out = np.empty((len(emb.test), maps[k].weight.shape[1]), np.float16)
        maps[k].apply(emb.test, out)
        assert np.isfinite(out).all() and np.abs(out).max() < 100
