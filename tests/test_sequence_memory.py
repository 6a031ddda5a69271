"""The sequence model's inputs at the real size: assembled in place as float16 (equal to the old
float64 concatenation rounded to float16), moments and shared-space maps in memory that does not
grow with the rows, and the edges (fewer than two test images, a fold's embeddings on another
fold's rows)."""
from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from competition.paths import WorkPaths
from level2_stacking import embeddings
from level2_stacking.embeddings import FoldEmbeddings, _moments, shared_space_maps
from level2_stacking.frame import build_stack_frame, fold_dir
from level2_stacking.sequence_data import build_sequence_inputs, logits, mapped, series_bounds, slice_inputs
from level2_stacking.synthetic import FabricatedModel, fabricate_competition, write_fabricated_work


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    root = tmp_path_factory.mktemp("seqmem")
    comp = fabricate_competition(n_patients=60, n_test_patients=12, slices=(10, 20), seed=5)
    paths = WorkPaths(root / "w")
    write_fabricated_work(paths, comp, {"a": FabricatedModel(2.0, embedding_dim=48), "b": FabricatedModel(2.5),
                                        "c": FabricatedModel(1.8, embedding_dim=40)}, seed=5)
    return build_stack_frame(paths), pd.read_parquet(paths.metadata)


def _old_concatenation(frame, metadata, inputs) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The inputs as they were built before: float64 logits concatenated with float16 mapped
    embedding blocks (promoted to float64), then cast to float16."""
    _, train_pos = series_bounds(frame.train_ids, metadata)
    _, test_pos = series_bounds(frame.test_ids, metadata)
    train_at, test_at = pd.Index(frame.train_ids), pd.Index(frame.test_ids)
    train_blocks, test_blocks = [], {k: [] for k in inputs.test}
    for m, maps in inputs.maps.items():
        block = np.zeros((len(frame.train_ids), maps[0].weight.shape[1]), np.float16)
        for k in maps:
            folder = fold_dir(frame.model_dirs[m], k)
            ids = pd.read_parquet(folder / "oof.parquet")["image_id"]
            block[train_at.get_indexer(ids)] = mapped(np.load(folder / "embeddings_oof.npy"), maps[k])
            test_ids = pd.read_parquet(folder / "test.parquet")["image_id"]
            test_blocks[k].append(mapped(np.load(folder / "embeddings_test.npy"), maps[k])[
                pd.Index(test_ids).get_indexer(test_at)])
        train_blocks.append(block)

    def concat(probs, pos, blocks):
        return np.concatenate([*(logits(p) for p in probs), pos[:, None], *blocks], axis=1).astype(np.float16)

    train = concat([frame.level1_oof[m] for m in frame.models], train_pos, train_blocks)
    tests = {k: concat([frame.level1_fold_test[m][k] for m in frame.models], test_pos, test_blocks[k])
             for k in inputs.test}
    return train, tests


def _equal_to_float16_rounding(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal, or one float16 step apart where float32 products of another chunking round the other way."""
    assert ours.dtype == np.float16 and ours.shape == theirs.shape
    steps = np.abs(ours.view(np.int16).astype(np.int32) - theirs.view(np.int16).astype(np.int32))
    assert (steps <= 1).all() and (steps == 0).mean() > 0.99


def test_inputs_built_in_place_equal_the_old_concatenation(fabricated) -> None:
    frame, metadata = fabricated
    inputs = build_sequence_inputs(frame, metadata, embedding_dim=6)
    assert inputs.embedding_dims == [6, 6] and inputs.train.dtype == np.float16
    old_train, old_test = _old_concatenation(frame, metadata, inputs)
    _equal_to_float16_rounding(inputs.train, old_train)
    for k, test in inputs.test.items():
        _equal_to_float16_rounding(test, old_test[k])


def test_slice_inputs_is_bit_for_bit_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    probs = [rng.random((50, 6)), rng.random((50, 6))]
    pos, blocks = rng.random(50), [rng.normal(size=(50, 4)).astype(np.float16), rng.normal(size=(50, 3)).astype(np.float16)]
    old = np.concatenate([*(logits(p) for p in probs), pos[:, None], *blocks], axis=1).astype(np.float16)
    np.testing.assert_array_equal(slice_inputs(probs, pos, blocks).view(np.int16), old.view(np.int16))


def _traced_build(frame, metadata, dim: int) -> tuple[int, int]:
    """Peak bytes allocated while building the inputs, and the bytes of the result."""
    tracemalloc.start()
    inputs = build_sequence_inputs(frame, metadata, embedding_dim=dim)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, inputs.train.nbytes + sum(t.nbytes for t in inputs.test.values())


def test_wider_inputs_cost_only_their_float16_bytes(fabricated) -> None:
    frame, metadata = fabricated
    _traced_build(frame, metadata, 4)  # warm caches (parquet readers, imports)
    (narrow_peak, narrow), (wide_peak, wide) = _traced_build(frame, metadata, 4), _traced_build(frame, metadata, 32)
    # What the width adds: in place, the float16 result (+ chunks); the old concatenation also
    # held a float64 copy of the train rows (4x their float16) and the embedding blocks.
    assert wide_peak - narrow_peak < 1.5 * (wide - narrow), (narrow_peak, narrow, wide_peak, wide)


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_moments_match_numpy_in_one_go(monkeypatch, offset) -> None:
    monkeypatch.setattr(embeddings, "CHUNK_BYTES", 4 * 7 * 37)  # 37 rows a chunk: many chunks, a ragged last one
    rng = np.random.default_rng(3)
    array = (offset + rng.normal(size=(1000, 7)) @ rng.normal(size=(7, 7))).astype(np.float16)
    mean, gram = _moments(array)
    exact = array.astype(np.float64)
    np.testing.assert_allclose(mean, exact.mean(axis=0), rtol=1e-9, atol=1e-9 * (1 + offset))
    cov = np.cov(exact, rowvar=False)
    np.testing.assert_allclose(gram / (len(array) - 1), cov, rtol=0, atol=1e-5 * np.abs(cov).max())


def _memory_mapped_folds(tmp_path, n_test: int, d: int) -> dict[int, FoldEmbeddings]:
    rng = np.random.default_rng(n_test)
    latent = rng.normal(size=(n_test, d))
    folds = {}
    for k in (0, 1):
        path = tmp_path / f"test{k}_{n_test}.npy"
        rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
        np.save(path, (latent @ rotation).astype(np.float16))
        test = np.load(path, mmap_mode="r")
        ids = np.arange(n_test)[::-1] if k else np.arange(n_test)  # fold 1 in another order: the gathering path
        folds[k] = FoldEmbeddings(test[:10], np.arange(10), test, ids)
    return folds


def test_shared_space_maps_take_memory_independent_of_the_rows(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(embeddings, "CHUNK_BYTES", 64 * 1024)
    d, peaks = 128, {}
    for n in (4_000, 32_000):
        folds = _memory_mapped_folds(tmp_path, n, d)
        tracemalloc.start()
        shared_space_maps(folds, dim=16)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Chunks and D x D float64 moments, whatever the rows; what grows is the id pairing (int64
    # indexes and pandas' hash table, tens of bytes a row), far below a float16 copy (2 D bytes a row).
    assert peaks[4_000] < 4 * embeddings.CHUNK_BYTES + 16 * d * d * 8 + 64 * 4_000, peaks
    assert peaks[32_000] - peaks[4_000] < 64 * 28_000 < 2 * d * 28_000, peaks


@pytest.mark.parametrize("n_test", [0, 1])
def test_fewer_than_two_test_images_are_refused_in_one_line(n_test) -> None:
    rng = np.random.default_rng(0)
    folds = {k: FoldEmbeddings(rng.normal(size=(5, 8)).astype(np.float16), np.arange(5),
                               rng.normal(size=(n_test, 8)).astype(np.float16), np.arange(n_test)) for k in (0, 1)}
    with pytest.raises(ValueError, match=rf"needs at least 2 of them \({n_test} here\).*--no-embeddings") as err:
        shared_space_maps(folds, dim=4)
    assert "\n" not in str(err.value)


def test_two_test_images_give_finite_float16() -> None:
    rng = np.random.default_rng(0)
    folds = {k: FoldEmbeddings(rng.normal(size=(5, 8)).astype(np.float16), np.arange(5),
                               rng.normal(size=(2, 8)).astype(np.float16), np.arange(2)) for k in (0, 1)}
    for k, linear in shared_space_maps(folds, dim=4).items():
        assert np.isfinite(mapped(folds[k].oof, linear)).all()


def test_a_fold_whose_embeddings_are_another_folds_rows_is_refused(fabricated, tmp_path) -> None:
    frame, metadata = fabricated
    folder = tmp_path / "a"
    shutil.copytree(frame.model_dirs["a"], folder)
    for name in ("oof.parquet", "embeddings_oof.npy"):  # fold 1's embedded OOF rows are fold 0's images
        shutil.copy(folder / "fold0" / name, folder / "fold1" / name)
    bad = frame.__class__(**{**frame.__dict__, "model_dirs": {**frame.model_dirs, "a": folder}})
    with pytest.raises(ValueError, match=r"a/fold1: the embedded OOF images are not exactly fold 1's rows"):
        build_sequence_inputs(bad, metadata)


def _rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise OSError("no RssFile")


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED") or not __import__("os").path.exists(
    "/proc/self/status"), reason="Linux only")
def test_read_embedding_pages_do_not_stay_resident(tmp_path) -> None:
    path = tmp_path / "emb.npy"
    np.save(path, np.ones((16_384, 2048), np.float16))  # 64 MiB
    array = np.load(path, mmap_mode="r")
    before = _rss_file_mb()
    mean, _ = _moments(array)
    assert mean[0] == 1.0
    assert _rss_file_mb() - before < 40  # without release() all 64 MiB of the file stay mapped in
