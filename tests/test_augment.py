"""Augmentation per model spec: ``aug`` on the spec, ``--set aug.<field>=``, the config round trip,
the spec's AugmentConfig reaching the training dataset."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from competition.constants import LABELS
from competition.metadata import build_metadata
from dicom_factory import write_ct
from features.augment import AugmentConfig
from features.cache import ImageCache, build_cache
from features.dataset import SliceDataset
from level1_models.config import ConfigError, TrainConfig, build_config, parse_sets, read_config
from level1_models.data import CacheDatasets

SIDE = 32
# Every augmentation off: a test turns on the one it looks at.
NONE = dict(hflip=0.0, vflip=0.0, crop=0.0, affine=0.0, brightness_contrast=0.0, erase=0.0)


# --- the config ---------------------------------------------------------------------------------


def test_set_parses_augmentation_fields_by_their_type():
    sets = parse_sets(["aug.rotate=30", "aug.scale=0.85,1.15", "aug.erase_holes=2,6", "aug.erase=0.5",
                       "augment=false"])
    assert sets == {"aug.rotate": 30.0, "aug.scale": (0.85, 1.15), "aug.erase_holes": (2, 6), "aug.erase": 0.5,
                    "augment": False}
    assert isinstance(sets["aug.erase_holes"][0], int)
    cfg = build_config("tiny_resnet", sets)
    assert cfg.aug == AugmentConfig(rotate=30.0, scale=(0.85, 1.15), erase_holes=(2, 6), erase=0.5)
    assert cfg.augment is False  # the switch for all augmentation still works beside aug
    assert build_config("tiny_resnet").aug == AugmentConfig()  # the other fields keep the spec's values
    with pytest.raises(ConfigError, match="expected 2 comma-separated values"):
        parse_sets(["aug.scale=0.9"])
    with pytest.raises(ConfigError, match="aug.erase_holes"):
        parse_sets(["aug.erase_holes=1.5,2"])


def test_unknown_or_bad_augmentation_fields_are_named():
    with pytest.raises(ConfigError, match=r"unknown augmentation field 'aug.rotat'\. Did you mean: aug.rotate"):
        parse_sets(["aug.rotat=30"])
    with pytest.raises(ConfigError, match="Did you mean: aug.erase_size"):
        build_config("tiny_resnet", {"aug.erase_sise": (0.1, 0.2)})
    with pytest.raises(ConfigError, match="one field at a time"):
        parse_sets(["aug=1"])
    # Values are checked by AugmentConfig, and the message names the field.
    with pytest.raises(ConfigError, match=r"aug\.erase is a probability"):
        build_config("tiny_resnet", parse_sets(["aug.erase=1.5"]))
    with pytest.raises(ValueError, match=r"aug\.scale must be ordered"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match=r"aug\.crop_scale must be <= 1"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match=r"aug\.hflip is a probability"):
        AugmentConfig(hflip=-0.1)


def test_config_json_and_checkpoint_round_trip_the_augmentations(tmp_path):
    from level1_models.checkpoint import load_checkpoint, make_state, save_checkpoint

    cfg = build_config("tiny_resnet", parse_sets(["aug.rotate=30", "aug.scale=0.8,1.25", "aug.erase=0.5"]))
    written = tmp_path / "config.json"
    written.write_text(json.dumps(cfg.to_dict()))
    saved = json.loads(written.read_text())
    assert saved["aug"]["scale"] == [0.8, 1.25] and saved["aug"]["erase"] == 0.5
    back = read_config(written)
    assert back == cfg and back.aug.scale == (0.8, 1.25) and isinstance(back.aug.erase_holes, tuple)
    # A config.json written before specs had ``aug`` reads as the default augmentations.
    old = {k: v for k, v in saved.items() if k != "aug"}
    assert TrainConfig.from_dict(old).aug == AugmentConfig()
    # The checkpoint keeps the config too (loaded with weights_only).
    save_checkpoint(tmp_path / "best.pt", make_state(cfg, torch.nn.Linear(1, 1), fold=0, epoch=1))
    assert TrainConfig.from_dict(load_checkpoint(tmp_path / "best.pt")["config"]) == cfg


def test_run_model_loads_its_datasets_with_the_specs_augmentations(tmp_path, monkeypatch):
    import level1_models.data as data_module
    import level1_models.train as train_module

    seen = {}

    def fake_load_inputs(data_dir, paths, combination, img_size, augment_config=AugmentConfig()):
        seen["aug"] = augment_config
        return "inputs"

    monkeypatch.setattr(data_module, "load_inputs", fake_load_inputs)
    monkeypatch.setattr(train_module, "run_oof", lambda cfg, inputs, *args, **kwargs: seen.update(cfg=cfg))
    train_module.run_model("tiny_resnet", tmp_path / "data", tmp_path / "work",
                           {"device": "cpu", "workers": 0, **parse_sets(["aug.rotate=25", "aug.vflip=0.5"])})
    assert seen["aug"] == AugmentConfig(rotate=25.0, vflip=0.5) == seen["cfg"].aug


# --- the datasets -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One series of five distinct slices, each with its own header window, cached at SIDE px."""
    tmp = tmp_path_factory.mktemp("aug")
    rng = np.random.default_rng(5)
    root = tmp / "comp"
    for k in range(5):
        stored = rng.integers(900, 1300, (SIDE, SIDE), dtype=np.uint16)
        write_ct(root / "stage_2_train" / f"ID_{k:09x}.dcm", stored, series="ID_00000000s0", z=100.0 + 5 * k,
                 window_center=f"{30 + 10 * k}\\{30 + 10 * k}", window_width=f"{60 + 40 * k}\\{60 + 40 * k}")
    meta = build_metadata(root, tmp / "metadata.parquet", workers=1, progress=False)
    build_cache(root, meta, tmp / "cache", size=SIDE, workers=1, progress=False)
    meta = meta.sort_values("slice_index", ignore_index=True)
    labels = pd.DataFrame({"image_id": meta["image_id"], **{label: 0.0 for label in LABELS}})
    return meta, labels, tmp / "cache"


def test_cache_datasets_augment_training_with_the_specs_config_and_not_validation(built):
    meta, labels, cache_dir = built
    ids = list(meta["image_id"])
    cfg = AugmentConfig(**{**NONE, "hflip": 1.0})
    factory = CacheDatasets(meta, labels, cache_dir, "brain3", SIDE, augment_config=cfg)
    train = factory(ids, labeled=True, augment=True)
    val = factory(ids, labeled=True, augment=False)
    assert train.augment and train.augment_config is cfg and not val.augment
    plain = SliceDataset(ids, meta, ImageCache(cache_dir), "brain3", SIDE)
    for n in range(len(ids)):
        assert torch.equal(val[n][0], plain[n][0])  # validation: never augmented
        assert torch.equal(train[n][0], plain[n][0].flip(-1))  # training: the spec's hflip at p 1
    # Without a config the factory keeps the default augmentations.
    assert CacheDatasets(meta, labels, cache_dir, "brain3", SIDE)(ids, True, True).augment_config == AugmentConfig()
