"""Level-1 runs beyond the basics: embeddings for level 2, unreadable images, resuming inside an
epoch (and from a truncated checkpoint), augmentation independent of the loader's workers."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_train import CPU, make_inputs, small_config

import level1_models.checkpoint as checkpoint_module
import level1_models.resume as resume_module
import level1_models.train as train_module
from competition.constants import LABELS
from level1_models.config import resolve
from level1_models.folder import ModelFolder
from level1_models.predict import load_fold_model, pooled_and_logits, tta_views
from level1_models.train import run_oof

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    inputs = make_inputs(n_train=48, n_test=8)
    cfg = small_config(epochs=1, batch_size=8)
    out = tmp_path_factory.mktemp("emb") / "tiny_resnet"
    run_oof(cfg, inputs, out, CPU)
    return cfg, inputs, out


def test_embeddings_are_the_best_models_pooled_features(embedded_run):
    cfg, inputs, out = embedded_run
    folder = ModelFolder(out)
    model, _ = load_fold_model("tiny_resnet", 1, model_dir=out)
    for split, ids in (("oof", pd.read_parquet(folder.fold_oof(1))["image_id"].tolist()), ("test", inputs.test_ids)):
        emb = np.load(folder.embeddings(1, split), mmap_mode="r")
        assert emb.dtype == np.float16 and emb.shape == (len(ids), model.num_features)
        ds = inputs.datasets(ids, labeled=False, augment=False)
        x = torch.stack([ds[i][0] for i in range(len(ids))])
        with torch.no_grad():  # recomputed here: the TTA mean of timm's pre-logits features
            expected = torch.stack([pooled_and_logits(model, v)[0] for v in tta_views(x, cfg.tta)]).mean(0)
        np.testing.assert_allclose(np.asarray(emb, dtype=np.float32), expected.numpy(), rtol=2e-3, atol=2e-3)
    assert not list(out.rglob(".*.tmp-*"))


def test_unreadable_images_are_not_trained_on_and_get_the_prior(tmp_path, capsys):
    inputs = make_inputs(n_train=48, n_test=8)
    bad_train, bad_val, bad_test = "ID_000000001", "ID_000000002", inputs.test_ids[0]  # folds: id % 2
    inputs.trainable = set(inputs.folds["image_id"]) - {bad_train, bad_val} | set(inputs.test_ids[1:])
    cfg = small_config(epochs=1, batch_size=8, folds=(0,))
    run_oof(cfg, inputs, tmp_path / "m", CPU)
    folder = ModelFolder(tmp_path / "m")
    done = json.loads(folder.fold_done(0).read_text())
    assert done["n_train"] == 23 and done["n_val_unreadable"] == 1 and done["n_test_unreadable"] == 1
    prior = np.asarray(done["prior_rates"])
    oof = pd.read_parquet(folder.fold_oof(0)).set_index("image_id")
    test = pd.read_parquet(folder.fold_test(0)).set_index("image_id")
    bad = bad_val if bad_val in oof.index else bad_train
    np.testing.assert_allclose(oof.loc[bad, list(LABELS)].to_numpy(float), prior)
    np.testing.assert_allclose(test.loc[bad_test, list(LABELS)].to_numpy(float), prior)
    assert not np.allclose(test.iloc[1][list(LABELS)].to_numpy(float), prior)  # the readable ones are predicted
    assert "unreadable test images (first: " + bad_test in capsys.readouterr().out


class Killed(Exception):
    pass


def _kill_after_saves(monkeypatch, n: int) -> list:
    """Make the n-th mid-epoch save of the resume state the last thing the run does."""
    saved = []
    real = checkpoint_module.save_rotating

    def save_then_maybe_die(path, previous, state):
        real(path, previous, state)
        saved.append(state["epoch_progress"]["step"])
        if len(saved) == n:
            raise Killed

    monkeypatch.setattr(resume_module, "save_rotating", save_then_maybe_die)
    return saved


@pytest.mark.parametrize("truncate", [False, True])
def test_a_run_killed_inside_an_epoch_resumes_there(tmp_path, monkeypatch, capsys, truncate):
    """Mid-epoch checkpoints (here after every step) let a killed run go on from the step it
    reached and end with the uninterrupted run's predictions; a truncated last.pt falls back to
    the checkpoint before it."""
    cfg = small_config(epochs=2, batch_size=4, checkpoint_minutes=1e-9)
    reference = tmp_path / "reference"
    run_oof(cfg, make_inputs(n_train=48, n_test=8), reference, CPU)
    out = tmp_path / "killed"
    saved = _kill_after_saves(monkeypatch, 3)
    with pytest.raises(Killed):
        run_oof(cfg, make_inputs(n_train=48, n_test=8), out, CPU)
    assert saved == [1, 2, 3]
    folder = ModelFolder(out)
    if truncate:
        data = folder.last(0).read_bytes()
        folder.last(0).write_bytes(data[: len(data) // 2])
    monkeypatch.undo()
    capsys.readouterr()
    run_oof(cfg, make_inputs(n_train=48, n_test=8), out, CPU)
    log = capsys.readouterr().out
    expected_step = 2 if truncate else 3
    assert f"resuming after epoch 0, {expected_step} batches into epoch 1" in log
    assert ("last.pt cannot be read" in log and "resuming from last.prev.pt instead" in log) == truncate
    ours, ref = pd.read_parquet(folder.oof), pd.read_parquet(ModelFolder(reference).oof)
    np.testing.assert_allclose(ours[list(LABELS)].to_numpy(), ref[list(LABELS)].to_numpy(), rtol=1e-5, atol=1e-6)
    assert not folder.last(0).exists() and not folder.previous(0).exists()


def test_augmentation_does_not_depend_on_the_worker(tmp_path, monkeypatch):
    """Two loader workers (persistent, built once per fold) give what loading in-process gives."""
    built = []
    real = train_module.train_loader
    monkeypatch.setattr(train_module, "train_loader", lambda *a, **k: built.append(1) or real(*a, **k))
    runs = {}
    for workers in (0, 2):
        cfg = small_config(epochs=2, batch_size=8, workers=workers, folds=(0,))
        run_oof(cfg, make_inputs(n_train=32, n_test=4), tmp_path / str(workers), CPU)
        runs[workers] = pd.read_parquet(ModelFolder(tmp_path / str(workers)).fold_oof(0))
    assert len(built) == 2  # one loader per fold, not per epoch
    np.testing.assert_allclose(runs[2][list(LABELS)].to_numpy(), runs[0][list(LABELS)].to_numpy(), rtol=1e-5)


def test_workers_default_to_the_cores_per_process(monkeypatch):
    import level1_models.config as config_module

    monkeypatch.setattr(config_module, "available_cores", lambda: 16)
    cfg = small_config(workers=None)  # resolved on this 1-process "machine"
    assert cfg.workers == 16
    cfg = resolve(train_module.build_model.__globals__["TrainConfig"].from_dict({**cfg.to_dict(), "workers": None}),
                  cuda_available=False, bf16_supported=False, local_processes=4)
    assert cfg.workers == 4


def test_a_cache_smaller_than_the_input_is_an_error_not_an_upsample(tmp_path, monkeypatch):
    import features.cache
    from level1_models.data import CacheDatasets, CacheTooSmallError

    monkeypatch.setattr(features.cache, "available_sizes", lambda cache_dir: [64, 128])
    with pytest.raises(CacheTooSmallError, match=r"is 128 px but this model reads 256 px.*CACHE_SIZE=256.*IMG_SIZE=128"):
        CacheDatasets(pd.DataFrame(), pd.DataFrame(), tmp_path, "bsb", 256)


def test_gpu_check_on_a_machine_without_a_gpu_says_so_and_passes(capsys, monkeypatch):
    from level1_models import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_gpu_check_models_run_at_their_spec_size_and_batch(tmp_path, capsys):
    """The path `make gpu-check MODELS=...` takes on a GPU, run on the CPU: each spec at its own
    size and batch from the real loader (the peak-memory line needs CUDA)."""
    from conftest import prepare_tiny_competition
    from level1_models import gpu_check

    data, paths = prepare_tiny_competition(tmp_path, cache_size=64)
    gpu_check.bench_models(data, paths.root, ["tiny_resnet"], None, steps=2, workers=0, compile_=False, warmup=1)
    out = capsys.readouterr().out
    assert "bench_model: tiny_resnet (test_resnet, 3 ch, 64 px, batch 32" in out
    for name in ("train_random_tensors", "train_data_loader", "tiny_resnet_train_loader_share"):
        assert f"{name}: " in out


def test_a_cache_without_the_test_images_is_an_error(tmp_path):
    inputs = make_inputs(n_train=16, n_test=4)
    inputs.trainable = set(inputs.folds["image_id"])  # the train images only
    with pytest.raises(ValueError, match="none of the 4 test images is in the image cache"):
        run_oof(small_config(epochs=1, batch_size=8, folds=(0,)), inputs, tmp_path / "m", CPU)
