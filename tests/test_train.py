"""Level-1 K-fold training: the loss, batching, schedule, config overrides, checkpoints, outputs and
resume, first on a small in-test dataset, then end to end on a synthetic competition."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from competition.constants import LABEL_WEIGHTS, LABELS
from conftest import prepare_tiny_competition
from competition.metric import weighted_log_loss
from level1_models.atomic import atomic_path, write_json
from level1_models.checkpoint import CheckpointMismatchError, load_checkpoint, load_weights
from level1_models.config import ConfigError, TrainConfig, build_config, parse_sets, resolve
from level1_models.data import RunInputs, sample_submission_ids
from level1_models.distributed import DistEnv
from level1_models.loop import Trainer, WeightAverage
from level1_models.modeling import PretrainedWeightsMissing, build_model, cached_weights, create_network, find_weights
from level1_models.predict import load_fold_model, predict_probabilities
from level1_models.train import (
    FoldData,
    ModelFolder,
    Runtime,
    epoch_batches,
    make_optimizer,
    make_scheduler,
    run_oof,
    weighted_bce_sum,
)

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

# --- a small learnable dataset ------------------------------------------------------------------


def _labels_for(n: int, seed: int = 0) -> np.ndarray:
    """Six labels per image; `any` = max of the subtypes, ~35% positive."""
    rng = np.random.default_rng(seed)
    sub = (rng.random((n, 5)) < 0.12).astype(np.int8)
    return np.concatenate([sub, sub.max(axis=1, keepdims=True)], axis=1)


class FakeSlices(Dataset):
    """C x S x S images whose label j shows as a bright square at position j; noise elsewhere.
    An image depends only on its id, so train, validation and test draws agree."""

    def __init__(self, image_ids, labels: np.ndarray, channels: int, size: int, augment: bool):
        self.ids, self.labels, self.channels, self.size, self.augment = list(image_ids), labels, channels, size, augment

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        rng = np.random.default_rng(int(self.ids[i][3:], 16))
        x = rng.normal(0.3, 0.1, (self.channels, self.size, self.size)).astype(np.float32)
        q = self.size // 4
        for j in range(5):
            if self.labels[i, j]:
                r, c = divmod(j, 3)
                x[:, r * q + 2 : r * q + q, c * q + 2 : c * q + q] += 0.8
        t = torch.from_numpy(x)
        if self.augment and torch.rand(()) < 0.5:  # the loop's seeded torch RNG drives this
            t = t + 0.01 * torch.randn_like(t)
        return t, torch.from_numpy(self.labels[i].astype(np.float32))


class FakeFactory:
    def __init__(self, labels: pd.DataFrame, hidden: pd.DataFrame, channels: int, size: int):
        self.table = pd.concat([labels, hidden]).set_index("image_id")
        self.channels, self.size = channels, size
        self.calls: list[tuple[int, bool, bool]] = []

    def __call__(self, image_ids, labeled: bool, augment: bool) -> Dataset:
        self.calls.append((len(image_ids), labeled, augment))
        y = self.table.loc[list(image_ids), list(LABELS)].to_numpy()  # test images show their hidden truth
        return FakeSlices(image_ids, y, self.channels, self.size, augment)


def make_inputs(n_train: int = 96, n_test: int = 24, n_folds: int = 2, channels: int = 3, size: int = 32) -> RunInputs:
    ids = [f"ID_{i:09x}" for i in range(1, n_train + n_test + 1)]
    y = _labels_for(len(ids))
    table = pd.DataFrame(y, columns=list(LABELS))
    table.insert(0, "image_id", ids)
    labels, hidden = table.iloc[:n_train].reset_index(drop=True), table.iloc[n_train:].reset_index(drop=True)
    folds = pd.DataFrame({"image_id": labels["image_id"], "fold": np.arange(n_train) % n_folds})
    test_ids = list(reversed(hidden["image_id"]))  # not sorted: the sample submission's order must be kept
    return RunInputs(folds=folds, labels=labels, test_ids=test_ids,
                     datasets=FakeFactory(labels, hidden, channels, size))


def small_config(**changes) -> TrainConfig:
    base = dict(epochs=1, img_size=32, batch_size=16, workers=0, device="cpu", augment=True, lr=3e-3)
    base.update(changes)
    return resolve(build_config("tiny_resnet", base), cuda_available=False, bf16_supported=False)


CPU = Runtime(device=torch.device("cpu"), env=DistEnv(), amp="off", channels_last=False)


# --- pieces ------------------------------------------------------------------------------------


def test_loss_mean_is_the_competition_metric():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(0, 2, (50, 6)))
    y = torch.tensor((rng.random((50, 6)) < 0.3).astype(np.float64))
    weights = torch.tensor([1, 1, 1, 1, 1, 2.0], dtype=torch.float64)
    ours = float(weighted_bce_sum(logits, y, weights)) / 50
    ref = weighted_log_loss(y.numpy(), torch.sigmoid(logits).numpy())
    assert ours == pytest.approx(ref, rel=1e-5)


def test_epoch_batches_partition_and_repeat():
    batches = epoch_batches(103, 16, seed=7)
    assert len(batches) == 6 and all(len(b) == 16 for b in batches)  # full batches only
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == len(flat) and flat.max() < 103
    assert all((a == b).all() for a, b in zip(batches, epoch_batches(103, 16, seed=7)))
    assert not all((a == b).all() for a, b in zip(batches, epoch_batches(103, 16, seed=8)))
    small = epoch_batches(5, 16, seed=0)
    assert len(small) == 1 and sorted(small[0].tolist()) == [0, 1, 2, 3, 4]


def test_schedule_warms_up_then_decays_to_zero():
    cfg = small_config(epochs=4, warmup_epochs=1.0, lr=1.0)
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0  # warmup rises
    assert lrs[10] == pytest.approx(1.0) and lrs[39] < 0.01  # cosine falls to ~0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_short_epochs_draw_a_new_share_of_the_images_each_time():
    a, b = epoch_batches(1000, 16, seed=1, fraction=0.25), epoch_batches(1000, 16, seed=2, fraction=0.25)
    assert len(a) == 250 // 16 and all(len(x) == 16 for x in a)
    flat_a, flat_b = np.concatenate(a), np.concatenate(b)
    assert len(set(flat_a.tolist())) == len(flat_a) and set(flat_a.tolist()) != set(flat_b.tolist())
    assert len(epoch_batches(10, 16, seed=0, fraction=0.1)[0]) == 10  # never less than a batch (or all)


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, steps_per_epoch=steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_matches_torch_multistep():
    """11th place's MultiStepLR (milestones 1,2,3, gamma 3/7), stepped per epoch in torch."""
    cfg = small_config(epochs=4, lr=1.0, scheduler="step", lr_milestones=(1, 2, 3), lr_gamma=3 / 7)
    ours = _lrs(cfg, steps_per_epoch=5)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    ref_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2, 3], gamma=3 / 7)
    reference = []
    for _ in range(4):
        reference += [opt.param_groups[0]["lr"]] * 5
        opt.step()
        ref_sched.step()
    assert ours == pytest.approx(reference)


def test_cosine_restarts_match_torch_warm_restarts_with_a_floor():
    """1st place's CosineAnnealingWarmRestarts (period in epochs, eta_min as a share of lr)."""
    cfg = small_config(epochs=6, lr=1.0, scheduler="cosine_restarts", restart_epochs=2, min_lr_ratio=0.02)
    ours = _lrs(cfg, steps_per_epoch=5)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, eta_min=0.02)
    reference = []
    for _ in range(30):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    assert ours == pytest.approx(reference)
    assert min(ours) >= 0.02 and ours[10] == pytest.approx(1.0)  # restarted


def test_plain_bce_loss_is_torch_mean_bce():
    logits, y = torch.randn(5, 6), (torch.rand(5, 6) > 0.7).float()
    cfg = small_config(loss="bce")
    trainer = Trainer(cfg, CPU, torch.nn.Identity(), [], None, None, None)  # only the loss weights are used
    ours = weighted_bce_sum(logits, y, trainer.label_weights) / len(y)
    assert ours == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item(), rel=1e-6)
    metric = Trainer(small_config(), CPU, torch.nn.Identity(), [], None, None, None).label_weights
    assert metric.tolist() == list(LABEL_WEIGHTS)


def test_weight_average_follows_timm_warmup_formula():
    """The average after each optimiser step, computed by hand from the weights' trajectory."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    expected = model.weight.detach().clone()
    for step in range(1, 8):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        average.update(step)
        # ModelEmaV3's warmup (gamma 1, power 2/3, counted from the first update, which copies).
        decay = 0.0 if step == 1 else min(0.9, 1 - (step - 1 + 1) ** (-2 / 3))
        expected = decay * expected + (1 - decay) * model.weight.detach()
        assert torch.allclose(average.module.weight, expected, atol=1e-6), step


def test_with_ema_the_validated_average_is_what_best_pt_keeps_and_predicts(tmp_path):
    inputs = make_inputs(n_train=96)
    cfg = small_config(epochs=2, lr=1e-2, batch_size=8, ema=0.9, tta="none", val_tta="none")
    metrics = run_oof(cfg, inputs, tmp_path / "m", CPU)
    folder = ModelFolder(tmp_path / "m")
    for k in (0, 1):
        curve = pd.read_csv(folder.curves_csv(k))
        assert metrics["folds"][str(k)]["weighted_log_loss"] == pytest.approx(curve["val_weighted_log_loss"].min(),
                                                                               rel=1e-6)
    plain = run_oof(small_config(epochs=2, lr=1e-2, batch_size=8, tta="none"), inputs, tmp_path / "p", CPU)
    assert plain["pooled"]["weighted_log_loss"] != pytest.approx(metrics["pooled"]["weighted_log_loss"], rel=1e-6)


@pytest.mark.parametrize("select", ["best", "last"])
def test_select_keeps_the_best_or_the_last_epochs_weights(tmp_path, monkeypatch, select):
    """Scripted validation losses (best at epoch 2, then worse): select=best keeps epoch 2's weights
    and stops after patience; select=last runs every epoch and keeps the last. Both record the best
    and the last epoch's validation loss, pooled by rows into metrics.json."""
    import level1_models.train as train_module
    script = [0.5, 0.3, 0.4, 0.45]
    ran = 3 if select == "best" else 4  # best: epoch 3 is worse and patience 1 stops there
    calls = []

    def scripted(y, p):  # one call per epoch; fold 1 starts the script over
        calls.append(len(y))
        return script[(len(calls) - 1) % ran]

    monkeypatch.setattr(train_module, "weighted_log_loss", scripted)
    inputs = make_inputs(n_train=48, n_test=8)
    cfg = small_config(epochs=4, batch_size=8, tta="none", patience=1, select=select)
    metrics = run_oof(cfg, inputs, tmp_path / "m", CPU)
    folder = ModelFolder(tmp_path / "m")
    for k in (0, 1):
        done = json.loads(folder.fold_done(k).read_text())
        assert done["epochs_run"] == ran and done["last_epoch"] == ran
        assert done["best_epoch"] == (2 if select == "best" else 4)
        assert load_checkpoint(folder.best(k))["epoch"] == done["best_epoch"]
        assert done["best_epoch_val_loss"] == 0.3 and done["best_epoch_by_val"] == 2
        assert done["last_epoch_val_loss"] == script[ran - 1]
    assert len(calls) == 2 * ran
    choice = metrics["epoch_choice"]
    assert choice["select"] == select
    assert choice["best_epoch_val_weighted_log_loss"] == pytest.approx(0.3)
    assert choice["flattery"] == pytest.approx(script[ran - 1] - 0.3)


def test_overrides_are_typed_and_unknown_fields_named():
    sets = parse_sets(["lr=3e-4", "augment=false", "folds=0,2", "limit=none", "compile=1"])
    assert sets == {"lr": 3e-4, "augment": False, "folds": (0, 2), "limit": None, "compile": True}
    cfg = build_config("tiny_resnet", {"epochs": 2, **sets})
    assert cfg.epochs == 2 and cfg.lr == 3e-4 and cfg.augment is False and cfg.arch == "test_resnet"
    with pytest.raises(ConfigError, match="Did you mean: epochs"):
        parse_sets(["epoch=3"])
    with pytest.raises(ConfigError, match="true or false"):
        parse_sets(["augment=maybe"])
    with pytest.raises(ConfigError, match="optimizer"):
        build_config("tiny_resnet", {"optimizer": "lion"})
    resolved = resolve(build_config("tiny_resnet"), cuda_available=False, bf16_supported=False)
    assert (resolved.device, resolved.amp, resolved.channels_last) == ("cpu", "off", False)
    gpu = resolve(build_config("tiny_resnet"), cuda_available=True, bf16_supported=True, local_rank=3)
    assert (gpu.device, gpu.amp, gpu.channels_last) == ("cuda:3", "bf16", True)
    with pytest.raises(ConfigError, match="no CUDA"):
        resolve(build_config("tiny_resnet", {"device": "cuda"}), cuda_available=False, bf16_supported=False)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}  # the old whole file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_tta_averages_the_mirror():
    class Asym(torch.nn.Module):  # the logit is the mean of the left half: flip-sensitive
        def forward(self, x):
            return x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))[:, None].repeat(1, 6)

    x = torch.zeros(1, 1, 4, 4)
    x[..., :2] = 2.0

    class One(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return x[0], torch.zeros(6)

    kw = dict(batch_size=1, device=torch.device("cpu"))
    plain = predict_probabilities(Asym(), One(), [0], tta="none", **kw)
    both = predict_probabilities(Asym(), One(), [0], tta="hflip", **kw)
    assert plain[0, 0] == pytest.approx(1 / (1 + math.exp(-2)))
    assert both[0, 0] == pytest.approx((1 / (1 + math.exp(-2)) + 0.5) / 2)


def test_sample_submission_ids_keep_file_order(tmp_path):
    csv = tmp_path / "s.csv"
    rows = [f"ID_{i}_{label}" for i in ("00000000b", "00000000a") for label in LABELS]
    pd.DataFrame({"ID": rows, "Label": 0.5}).to_csv(csv, index=False)
    assert sample_submission_ids(csv) == ["ID_00000000b", "ID_00000000a"]


# --- pretrained weights: never the network ---------------------------------------------------


def test_missing_weights_train_from_scratch_or_fail(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = small_config()
    assert cached_weights(cfg.arch, hf_cache_dir=tmp_path / "hf") is None
    build_model(cfg)
    assert "training from scratch" in capsys.readouterr().err
    with pytest.raises(PretrainedWeightsMissing, match="require_pretrained"):
        find_weights(small_config(require_pretrained=True))
    with pytest.raises(PretrainedWeightsMissing, match="does not exist"):
        find_weights(small_config(pretrained_file=str(tmp_path / "nope.pth")))


def test_local_weights_file_and_hf_cache_are_used(tmp_path, monkeypatch):
    import safetensors.torch
    import timm

    # An "ImageNet" test_resnet: 1000 classes, 3 input channels.
    imagenet = timm.create_model("test_resnet", pretrained=False)
    sd = {k: v.contiguous() for k, v in imagenet.state_dict().items()}
    cfg = small_config(combination="brain3")  # 3 windows
    for path in (tmp_path / "w.pth", tmp_path / "w.safetensors"):
        if path.suffix == ".pth":
            torch.save(sd, path)
        else:
            safetensors.torch.save_file(sd, str(path))
        model = build_model(TrainConfig.from_dict({**cfg.to_dict(), "pretrained_file": str(path)}), announce=False)
        assert torch.equal(model.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])
        assert model.state_dict()["fc.weight"].shape[0] == 6  # the ImageNet head is replaced
    # timm's Hugging Face cache layout: models--timm--<repo>/snapshots/<rev>/model.safetensors
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    snap = tmp_path / "hf" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    safetensors.torch.save_file(sd, str(snap / "model.safetensors"))
    (tmp_path / "hf" / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / "hf" / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    assert cached_weights("test_resnet", hf_cache_dir=tmp_path / "hf") == snap / "model.safetensors"


# --- K-fold runs on the small dataset ----------------------------------------------------------


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    # 192 images: with 96 (48 per fold) whether 18 steps learn much depended on the seed.
    inputs = make_inputs(n_train=192)
    # val_tta = tta: the OOF rows are then the best epoch's validation predictions exactly.
    cfg = small_config(epochs=3, lr=1e-2, batch_size=8, val_tta="hflip")
    out = tmp_path_factory.mktemp("l1") / "tiny_resnet"
    epochs_seen = []
    metrics = run_oof(cfg, inputs, out, CPU, on_epoch_end=lambda f, e, row: epochs_seen.append((f, e)))
    return cfg, inputs, out, metrics, epochs_seen


def test_run_writes_every_output(fake_run):
    cfg, inputs, out, metrics, epochs_seen = fake_run
    folder = ModelFolder(out)
    assert epochs_seen == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    for path in (folder.oof, folder.test, folder.metrics, folder.config, folder.curves_png,
                 folder.best(0), folder.best(1), folder.curves_csv(0), folder.curves_csv(1)):
        assert path.is_file() and path.stat().st_size > 0, path
    assert not folder.last(0).exists()  # the resume state goes once the fold is done
    assert not list(out.rglob(".*.tmp-*"))
    oof = pd.read_parquet(folder.oof)
    assert list(oof.columns) == ["image_id", "fold", *LABELS]
    assert sorted(oof["image_id"]) == sorted(inputs.folds["image_id"]) and not oof["image_id"].duplicated().any()
    merged = oof.merge(inputs.folds, on="image_id", suffixes=("", "_table"))
    assert (merged["fold"] == merged["fold_table"]).all()
    test = pd.read_parquet(folder.test)
    assert test["image_id"].tolist() == inputs.test_ids
    fold_tests = [pd.read_parquet(folder.fold_test(k))[list(LABELS)].to_numpy() for k in (0, 1)]
    np.testing.assert_allclose(test[list(LABELS)].to_numpy(), np.mean(fold_tests, axis=0))
    assert ((oof[list(LABELS)] > 0) & (oof[list(LABELS)] < 1)).all().all()

    m = json.loads(folder.metrics.read_text())
    y = inputs.label_array(oof["image_id"])
    assert m["complete"] and m["folds_done"] == [0, 1]
    assert m["pooled"]["weighted_log_loss"] == pytest.approx(weighted_log_loss(y, oof[list(LABELS)].to_numpy()))
    assert set(m["pooled"]["per_label_log_loss"]) == set(LABELS) and set(m["pooled"]["roc_auc"]) == set(LABELS)
    for k in ("0", "1"):
        assert {"weighted_log_loss", "per_label_log_loss", "roc_auc", "n", "best_epoch"} <= set(m["folds"][k])
    # The OOF of a fold are its best epoch's validation predictions (same TTA, same weights).
    for k in (0, 1):
        curve = pd.read_csv(folder.curves_csv(k))
        assert list(curve["epoch"]) == [1, 2, 3]
        assert m["folds"][str(k)]["weighted_log_loss"] == pytest.approx(curve["val_weighted_log_loss"].min(), rel=1e-6)
    saved = json.loads(folder.config.read_text())
    assert saved["arch"] == "test_resnet" and saved["epochs"] == 3 and saved["device"] == "cpu"
    assert TrainConfig.from_dict(saved) == cfg


def test_a_rerun_keeps_finished_folds(fake_run, capsys):
    cfg, inputs, out, metrics, _ = fake_run
    before = ModelFolder(out).best(0).stat().st_mtime_ns
    again = run_oof(cfg, inputs, out, CPU)
    assert "finished earlier" in capsys.readouterr().out
    assert ModelFolder(out).best(0).stat().st_mtime_ns == before
    assert again["pooled"] == metrics["pooled"]


def test_checkpoints_load_weights_only_and_refuse_other_architectures(fake_run):
    cfg, inputs, out, _, _ = fake_run
    path = ModelFolder(out).best(0)
    state = torch.load(path, weights_only=True)  # plain tensors and JSON-like values only
    assert state["arch"] == "test_resnet" and state["fold"] == 0
    other = resolve(build_config("tiny_convnext", {"combination": cfg.combination}), False, False)
    with pytest.raises(CheckpointMismatchError, match="test_resnet.*test_convnext"):
        load_weights(create_network(other), load_checkpoint(path), other, path)
    # Same architecture, other input channels: the shapes do not fit and the message says so.
    wide = TrainConfig.from_dict({**cfg.to_dict(), "combination": "bsb3"})
    with pytest.raises(CheckpointMismatchError):
        load_weights(create_network(wide), load_checkpoint(path), wide, path)


def test_load_fold_model_reproduces_the_oof(fake_run):
    cfg, inputs, out, _, _ = fake_run
    model, loaded_cfg = load_fold_model("tiny_resnet", 1, model_dir=out)
    assert loaded_cfg == cfg and not model.training
    val_ids = inputs.folds.loc[inputs.folds["fold"] == 1, "image_id"].tolist()
    ds = inputs.datasets(val_ids, labeled=True, augment=False)
    pred = predict_probabilities(model, ds, range(len(ds)), batch_size=32, device=torch.device("cpu"), tta=cfg.tta)
    oof = pd.read_parquet(ModelFolder(out).fold_oof(1))
    np.testing.assert_allclose(pred, oof[list(LABELS)].to_numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="belongs to model"):
        load_fold_model("tiny_convnext", 1, model_dir=out)


def test_learns_better_than_the_constant_prior(fake_run):
    _, _, _, metrics, _ = fake_run
    # Measured 0.43-0.55 x the prior over seeds 42-44 (2026-11-25); the margin leaves room for noise.
    assert metrics["pooled"]["weighted_log_loss"] < 0.75 * metrics["prior_baseline"]["weighted_log_loss"]


def test_interrupted_run_resumes_to_the_same_predictions(tmp_path):
    """A run stopped after fold 1's first epoch keeps fold 0, resumes fold 1 from its checkpoint
    (running only the missing epochs) and ends with the predictions of an uninterrupted run."""
    cfg = small_config(epochs=2, batch_size=8)
    reference = tmp_path / "reference"
    run_oof(cfg, make_inputs(n_train=48, n_test=8), reference, CPU)

    class Killed(Exception):
        pass

    def die(fold, epoch, row):
        if (fold, epoch) == (1, 1):
            raise Killed

    out = tmp_path / "interrupted"
    with pytest.raises(Killed):
        run_oof(cfg, make_inputs(n_train=48, n_test=8), out, CPU, on_epoch_end=die)
    folder = ModelFolder(out)
    assert (folder.fold_done(0).is_file() and folder.last(1).is_file() and not folder.fold_done(1).exists()
            and not folder.oof.exists())
    assert load_checkpoint(folder.last(1))["epoch"] == 1
    seen = []
    run_oof(cfg, make_inputs(n_train=48, n_test=8), out, CPU, on_epoch_end=lambda f, e, row: seen.append((f, e)))
    assert seen == [(1, 2)]  # only the missing epoch ran
    ours, ref = pd.read_parquet(folder.oof), pd.read_parquet(ModelFolder(reference).oof)
    np.testing.assert_allclose(ours[list(LABELS)].to_numpy(), ref[list(LABELS)].to_numpy(), rtol=1e-5, atol=1e-6)
    assert pd.read_csv(folder.curves_csv(1))["epoch"].tolist() == [1, 2]


class RelabelledSlices(FakeSlices):
    """FakeSlices drawn from the original labels (the images stay the same) but trained on ``targets``."""

    def __init__(self, image_ids, labels: np.ndarray, targets: np.ndarray, channels: int, size: int, augment: bool):
        super().__init__(image_ids, labels, channels, size, augment)
        self.targets = targets

    def __getitem__(self, i: int):
        x, _ = super().__getitem__(i)
        return x, torch.from_numpy(self.targets[i].astype(np.float32))


class RelabelledFactory:
    """A FakeFactory's images with the training targets of ``targets`` (test images keep their truth)."""

    def __init__(self, base: FakeFactory, targets: pd.DataFrame):
        self.table, self.channels, self.size = base.table, base.channels, base.size
        self.targets = pd.concat([targets.set_index("image_id"), base.table.drop(index=targets["image_id"])])

    def __call__(self, image_ids, labeled: bool, augment: bool) -> Dataset:
        ids = list(image_ids)
        y = self.table.loc[ids, list(LABELS)].to_numpy()
        t = self.targets.loc[ids, list(LABELS)].to_numpy()
        return RelabelledSlices(ids, y, t, self.channels, self.size, augment)


def test_fold_data_trains_only_on_other_folds():
    inputs = make_inputs(n_train=30, n_test=4, n_folds=3)
    every = set(inputs.folds["image_id"])
    for k in (0, 1, 2):
        fd = FoldData.build(small_config(), k, inputs, DistEnv())
        assert not set(fd.train_ids) & set(fd.val_ids)
        assert set(fd.train_ids) | set(fd.val_ids) == every and len(fd.train_ids) + len(fd.val_ids) == len(every)
        assert fd.val_ids == inputs.folds.loc[inputs.folds["fold"] == k, "image_id"].tolist()


def test_no_fold_model_sees_its_validation_labels(tmp_path):
    """Flipping the labels of fold 0's held-out images (its images unchanged) leaves fold 0's OOF
    rows bit-for-bit the same and changes fold 1's, which trains on them."""
    cfg = small_config(epochs=1, batch_size=8, augment=False)
    base = make_inputs(n_train=32, n_test=4)
    held_out = base.folds.loc[base.folds["fold"] == 0, "image_id"]
    flipped = base.labels.copy()
    rows = flipped["image_id"].isin(held_out)
    flipped.loc[rows, list(LABELS)] = 1 - flipped.loc[rows, list(LABELS)]
    changed = RunInputs(folds=base.folds, labels=flipped, test_ids=base.test_ids,
                        datasets=RelabelledFactory(base.datasets, flipped))
    assert not np.array_equal(changed.label_array(held_out), base.label_array(held_out))
    # Both runs go through the same factory class, so only the labels differ.
    same = RunInputs(folds=base.folds, labels=base.labels, test_ids=base.test_ids,
                     datasets=RelabelledFactory(base.datasets, base.labels))
    oof = {}
    for name, inputs in (("same", same), ("changed", changed)):
        run_oof(cfg, inputs, tmp_path / name, CPU)
        oof[name] = pd.read_parquet(ModelFolder(tmp_path / name).oof).set_index("image_id")
    a, b = oof["same"], oof["changed"]
    for k in (0, 1):
        rows_a, rows_b = a[a["fold"] == k][list(LABELS)], b.loc[a.index[a["fold"] == k], list(LABELS)]
        if k == 0:
            np.testing.assert_allclose(rows_b.to_numpy(), rows_a.to_numpy(), rtol=0, atol=1e-12,
                                       err_msg="fold 0's OOF depends on its own validation labels: it trained on them")
        else:
            assert np.abs(rows_b.to_numpy() - rows_a.to_numpy()).max() > 1e-6, "fold 1 ignored its training labels"


def test_partial_folds_write_metrics_but_no_oof(tmp_path):
    inputs = make_inputs(n_folds=3)
    out = tmp_path / "m"
    metrics = run_oof(small_config(folds=(1,), limit=20), inputs, out, CPU)
    folder = ModelFolder(out)
    assert metrics["folds_done"] == [1] and not metrics["complete"]
    assert folder.metrics.is_file() and not folder.oof.exists() and not folder.test.exists()
    assert json.loads(folder.fold_done(1).read_text())["n_train"] == 20  # --limit caps training images
    assert len(pd.read_parquet(folder.fold_oof(1))) == (inputs.folds["fold"] == 1).sum()  # validation stays whole
    with pytest.raises(ConfigError, match="folds \\[7\\]"):
        run_oof(small_config(folds=(7,)), inputs, out, CPU)
    with pytest.raises(ConfigError, match="other settings"):
        run_oof(small_config(folds=(0,), img_size=48), inputs, out, CPU)


def test_bench_reports_random_and_data_fed_rates(capsys):
    from level1_models.bench import print_bench, run_bench

    cfg = small_config(batch_size=4, eval_batch_size=4)
    figures = run_bench(cfg, CPU, make_inputs(n_train=24, n_test=4), steps=2, warmup=1)
    assert set(figures) == {"train_random_tensors", "infer_random_tensors", "train_data_loader", "train_data_wait",
                            "infer_data_loader", "infer_data_wait"}
    assert all(v > 0 for k, v in figures.items() if not k.endswith("_wait"))
    assert all(0 <= figures[k] <= 100 for k in ("train_data_wait", "infer_data_wait"))
    print_bench(cfg, CPU, figures)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("train_random_tensors: ") and lines[1].endswith(" images/s")
    assert all(": " in line for line in lines)


# --- end to end on a synthetic competition (Kaggle layout -> prepare -> cache -> oof) -----------

E2E_OPTIONS = ["--model", "tiny_resnet", "--epochs", "1", "--img-size", "32", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny synthetic competition, prepared like `make prepare` does, with two folds."""
    root = tmp_path_factory.mktemp("synthetic")
    data, paths = prepare_tiny_competition(root)
    return data, paths.root


def _copy_prepared(work: Path, to: Path) -> Path:
    """A fresh work folder sharing the prepared tables and cache (no model folders)."""
    import shutil

    shutil.copytree(work, to, ignore=shutil.ignore_patterns("models"))
    return to


@pytest.fixture(scope="session")
def e2e_run(synthetic, tmp_path_factory) -> tuple[Path, Path, str]:
    """`python -m level1_models oof` (in process): one epoch, two folds, on the tiny competition."""
    from level1_models.__main__ import main

    data, work = synthetic
    work = _copy_prepared(work, tmp_path_factory.mktemp("e2e") / "work")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["oof", "--data", str(data), "--work", str(work), *E2E_OPTIONS]) == 0
    return data, work, printed.getvalue()


def test_cli_oof_on_a_synthetic_competition_writes_every_output(e2e_run):
    data, work, printed = e2e_run
    assert "fold 0: best epoch 1/1" in printed and "fold 1: best epoch 1/1" in printed
    folder = ModelFolder(work / "models" / "tiny_resnet")
    for path in (folder.oof, folder.test, folder.metrics, folder.config, folder.curves_png,
                 folder.best(0), folder.best(1), folder.curves_csv(0), folder.curves_csv(1)):
        assert path.is_file() and path.stat().st_size > 0, path
    train_ids = pd.read_parquet(work / "labels.parquet")["image_id"]
    oof = pd.read_parquet(folder.oof)
    assert sorted(oof["image_id"]) == sorted(train_ids)  # every train image exactly once
    assert not oof["image_id"].duplicated().any()
    test = pd.read_parquet(folder.test)
    assert test["image_id"].tolist() == sample_submission_ids(data / "stage_2_sample_submission.csv")
    assert np.isfinite(test[list(LABELS)].to_numpy()).all()
    metrics = json.loads(folder.metrics.read_text())
    assert metrics["complete"] and set(metrics["folds"]) == {"0", "1"}
    saved = json.loads(folder.config.read_text())
    assert saved["img_size"] == 32 and saved["epochs"] == 1 and saved["combination"] == "bsb"


def _same_size_and_mtime_edit(path: Path, edit) -> None:
    """Rewrite a table through ``edit`` and give it back its size and mtime: only the content differs."""
    stat = path.stat()
    table = edit(pd.read_parquet(path))
    table.to_parquet(path, index=False)
    assert path.stat().st_size == stat.st_size, "the edit was meant to keep the size"
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_finished_model_is_kept_without_training_code_until_an_input_changes(e2e_run, tmp_path, monkeypatch, capsys):
    """A rerun of `oof` on a finished model skips (never reaching run_model); a fold's predictions
    edited in place, with the same size and mtime, are reassembled into oof.parquet."""
    import shutil

    import level1_models.train as train_module
    from level1_models.__main__ import main

    data, work, _ = e2e_run
    work = Path(shutil.copytree(work, tmp_path / "work"))
    folder = ModelFolder(work / "models" / "tiny_resnet")
    command = ["oof", "--data", str(data), "--work", str(work), *E2E_OPTIONS]
    real_run_model = train_module.run_model
    calls = []
    monkeypatch.setattr(train_module, "run_model", lambda *a, **k: calls.append(a) or real_run_model(*a, **k))

    assert main(command) == 0  # the copy's stamp names the fixture's paths: assembled once here
    assert main(command) == 0
    assert len(calls) == 1 and "up to date" in capsys.readouterr().out.splitlines()[-1]

    image = pd.read_parquet(folder.fold_oof(0))["image_id"].iloc[0]

    def flip(oof: pd.DataFrame) -> pd.DataFrame:
        oof.loc[0, "any"] = 1.0 - oof.loc[0, "any"]
        return oof

    _same_size_and_mtime_edit(folder.fold_oof(0), flip)
    assert main(command) == 0
    assert len(calls) == 2 and "up to date" not in capsys.readouterr().out
    edited = pd.read_parquet(folder.fold_oof(0)).set_index("image_id").loc[image, "any"]
    assert pd.read_parquet(folder.oof).set_index("image_id").loc[image, "any"] == edited
    assert main(command) == 0 and len(calls) == 2  # assembled again: the next rerun skips

    with pytest.raises(ConfigError, match=r"folds \[7\] are not in the folds table"):
        main([*command, "--folds", "0,7"])  # a fold that is not done goes the full way (and fails there)
    assert len(calls) == 3


@pytest.mark.slow  # a fresh interpreter imports torch + timm: ~10 s alone, minutes on a loaded box
def test_killed_run_restarts_where_it_stopped(e2e_run, synthetic, tmp_path, capsys):
    """SIGKILL a real `oof` process once its first checkpoint exists, restart it, and get what
    the uninterrupted run got; a kill never leaves a half file that looks whole."""
    from level1_models.__main__ import main

    data, reference, _ = e2e_run
    killed = _copy_prepared(synthetic[1], tmp_path / "killed")
    folder = ModelFolder(killed / "models" / "tiny_resnet")
    command = ["oof", "--data", str(data), "--work", str(killed), *E2E_OPTIONS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "level1_models", *command], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not folder.last(0).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert folder.last(0).exists(), "the run ended or stalled before its first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not folder.oof.exists() and not folder.test.exists()
    for done in folder.root.glob("fold*/done.json"):  # whatever is marked finished is whole
        json.loads(done.read_text())
    capsys.readouterr()
    assert main(command) == 0
    restarted = capsys.readouterr().out
    assert "resuming after epoch" in restarted or "finished earlier" in restarted
    assert not list(folder.root.rglob(".*.tmp-*"))
    ours = pd.read_parquet(folder.oof)
    ref = pd.read_parquet(ModelFolder(reference / "models" / "tiny_resnet").oof)
    assert ours["image_id"].tolist() == ref["image_id"].tolist()
    np.testing.assert_allclose(ours[list(LABELS)].to_numpy(), ref[list(LABELS)].to_numpy(), rtol=1e-4, atol=1e-6)
