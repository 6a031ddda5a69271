"""Augmentation per model spec: ``aug`` on the spec, ``--set aug.<field>=``, the config round trip,
the spec's AugmentConfig reaching the training dataset, and the distortion and channel swap."""
from __future__ import annotations

import json
import types

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch

from competition.constants import LABELS
from competition.metadata import build_metadata
from dicom_factory import write_ct
from features.augment import AugmentConfig, Augmenter, distortion
from features.cache import HU_MIN, ImageCache, build_cache
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
    with pytest.raises(ConfigError, match="Did you mean: aug.channel_swap"):
        build_config("tiny_resnet", {"aug.chanel_swap": 1.0})
    with pytest.raises(ConfigError, match="one field at a time"):
        parse_sets(["aug=1"])
    # Values are checked by AugmentConfig, and the message names the field.
    with pytest.raises(ConfigError, match=r"aug\.erase is a probability"):
        build_config("tiny_resnet", parse_sets(["aug.erase=1.5"]))
    with pytest.raises(ValueError, match=r"aug\.scale must be ordered"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match=r"aug\.crop_scale must be <= 1"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match=r"aug\.distort is a probability"):
        AugmentConfig(distort=-0.1)


def test_config_json_and_checkpoint_round_trip_the_augmentations(tmp_path):
    from level1_models.checkpoint import load_checkpoint, make_state, save_checkpoint

    cfg = build_config("tiny_resnet", parse_sets(["aug.rotate=30", "aug.scale=0.8,1.25", "aug.distort=0.5"]))
    written = tmp_path / "config.json"
    written.write_text(json.dumps(cfg.to_dict()))
    saved = json.loads(written.read_text())
    assert saved["aug"]["scale"] == [0.8, 1.25] and saved["aug"]["distort"] == 0.5
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

    def fake_load_inputs(data_dir, paths, combination, img_size, model="", augment_config=AugmentConfig()):
        seen["aug"] = augment_config
        return types.SimpleNamespace(datasets=None)  # what run_model reads before run_oof

    monkeypatch.setattr(data_module, "load_inputs", fake_load_inputs)
    monkeypatch.setattr(train_module, "run_oof", lambda cfg, inputs, *args, **kwargs: seen.update(cfg=cfg))
    train_module.run_model("tiny_resnet", tmp_path / "data", tmp_path / "work",
                           {"device": "cpu", "workers": 0, **parse_sets(["aug.rotate=25", "aug.channel_swap=0.5"])})
    assert seen["aug"] == AugmentConfig(rotate=25.0, channel_swap=0.5) == seen["cfg"].aug


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


@pytest.mark.parametrize("combination, per_slice", [("brain3", 1), ("meta3", 1), ("bsb3", 3)])
def test_channel_swap_reverses_the_slices_not_the_windows(built, combination, per_slice):
    meta, _, cache_dir = built
    ids = list(meta["image_id"])[1:4]  # middle slices: three distinct neighbours each
    cache = ImageCache(cache_dir)
    plain = SliceDataset(ids, meta, cache, combination, SIDE)
    swapped = SliceDataset(ids, meta, cache, combination, SIDE, augment=True,
                           augment_config=AugmentConfig(**NONE, channel_swap=1.0))
    for n in range(len(ids)):
        x, s = plain[n][0], swapped[n][0]
        blocks = x.reshape(3, per_slice, SIDE, SIDE)  # previous, current, next; windows inside each
        assert not torch.equal(blocks[0], blocks[2])
        # meta3: each slice keeps its own header window (a swap of the slices alone would fail here).
        assert torch.equal(s, blocks.flip(0).reshape(x.shape))


def test_channel_swap_leaves_a_one_slice_combination_alone(built):
    meta, _, cache_dir = built
    ids = list(meta["image_id"])
    cache = ImageCache(cache_dir)
    plain = SliceDataset(ids, meta, cache, "bsb", SIDE)
    swapped = SliceDataset(ids, meta, cache, "bsb", SIDE, augment=True,
                           augment_config=AugmentConfig(**NONE, channel_swap=1.0))
    assert all(torch.equal(swapped[n][0], plain[n][0]) for n in range(len(ids)))


def test_a_seeded_dataset_repeats_its_augmentations(built):
    meta, _, cache_dir = built
    ids = list(meta["image_id"])
    cfg = AugmentConfig(distort=1.0, channel_swap=0.5, erase=0.5)

    def run(seed: int) -> list[torch.Tensor]:
        ds = SliceDataset(ids, meta, ImageCache(cache_dir), "brain3", SIDE, augment=True, augment_config=cfg)
        out = []
        for n in range(len(ids)):
            ds.reseed(seed * 100 + n)
            out.append(ds[n][0])
        return out

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    # The channel swap's draw follows the reseed too (whatever the augmenter's first seed and what
    # it drew before), and both outcomes happen.
    draws = []
    for first_seed, order in ((0, range(40)), (123, reversed(range(40)))):
        aug = Augmenter(SIDE, AugmentConfig(channel_swap=0.5), seed=first_seed)
        decided = {}
        for seed in order:
            aug.reseed(seed)
            decided[seed] = aug.swap_slices(3)
        draws.append([decided[seed] for seed in range(40)])
    assert draws[0] == draws[1] and 5 < sum(draws[0]) < 35


# --- the distortion -----------------------------------------------------------------------------


def _head(side: int, k: int) -> np.ndarray:
    """K identical H x W x K slices of a bright disc (500 HU) on 40 HU tissue."""
    yy, xx = np.mgrid[:side, :side]
    disc = np.where((yy - side / 2) ** 2 + (xx - side / 3) ** 2 < (side / 5) ** 2, 500.0, 40.0)
    return np.repeat(disc[..., None], k, axis=2).astype(np.float32)


@pytest.mark.parametrize("k", [3, 6])  # 6 > 4: albumentations hands cv2 the channels in chunks
def test_distortion_warps_every_slice_alike_and_fills_with_air(k):
    hu = _head(64, k)
    members = distortion(1.0).transforms
    assert [type(t).__name__ for t in members] == ["SmoothElastic", "GridDistortion", "OpticalDistortion"]
    for member in members:
        air = False
        for seed in range(4):
            out = A.Compose([member], seed=seed)(image=hu)["image"]
            assert out.shape == hu.shape and out.dtype == np.float32
            assert not np.array_equal(out, hu), type(member).__name__
            for c in range(1, k):  # one warp, one border, for every slice
                np.testing.assert_array_equal(out[..., c], out[..., 0])
            assert out.min() >= HU_MIN and out.max() <= 500.0 + 1e-3
            air |= bool((out == HU_MIN).any())
        assert air, f"{type(member).__name__} never showed its border (air) in 4 draws"
    # Through the Augmenter (p 1, everything else off): some draw shows air, on every slice alike.
    aug = Augmenter(64, AugmentConfig(**NONE, distort=1.0), seed=0)
    outs = [aug.geometric(hu) for _ in range(6)]
    assert all(np.array_equal(o[..., c], o[..., 0]) for o in outs for c in range(k))
    assert any((o == HU_MIN).any() for o in outs) and all(not np.array_equal(o, hu) for o in outs)


def test_distort_off_adds_nothing_to_the_pipeline():
    # At 0 the distortion is left out, so the other transforms draw exactly as before it existed.
    assert len(Augmenter(32, AugmentConfig()).geo.transforms) == 4
    assert len(Augmenter(32, AugmentConfig(distort=0.5)).geo.transforms) == 5
