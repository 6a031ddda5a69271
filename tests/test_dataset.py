"""SliceDataset: windows of the right neighbours in z order, labels, bad images, augmentation."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from torch.utils.data import DataLoader

from competition.constants import LABELS
from competition.metadata import build_metadata
from dicom_factory import write_ct
from features.augment import Affine, AugmentConfig, Augmenter, BrightnessContrast
from competition.dicom import read_hu
from features.cache import ImageCache, build_cache
from features.crop import to_original
from features.dataset import SliceDataset, cached_only, neighbour_ids
from features.windows import apply_combination

SIDE = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three series (one of a single slice), z in no file-name order, header windows per series."""
    tmp = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(3)
    root = tmp / "comp"
    for s, n in enumerate((6, 4, 1)):
        for z in rng.permutation(n) * 4.5 + 100.0:
            image_id = f"ID_{rng.integers(0, 16**9):09x}"
            write_ct(root / "stage_2_train" / f"{image_id}.dcm", rng.integers(900, 1300, (SIDE, SIDE), dtype=np.uint16),
                     series=f"ID_00000000s{s}", z=float(z), window_center=f"{30 + 10 * s}\\{30 + 10 * s}",
                     window_width=f"{70 + 30 * s}\\{70 + 30 * s}")
    meta = build_metadata(root, tmp / "metadata.parquet", workers=1, progress=False)
    build_cache(root, meta, tmp / "cache", size=SIDE, workers=1, progress=False)
    return root, meta, ImageCache(tmp / "cache")


def z_sorted_series(root, paths):
    """Brute force, straight from the files: series -> image ids sorted by ImagePositionPatient z."""
    series: dict[str, list] = {}
    for p in paths:
        ds = pydicom.dcmread(root / p, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesInstanceUID), []).append((float(ds.ImagePositionPatient[2]), str(ds.SOPInstanceUID)))
    return {s: [i for _, i in sorted(v)] for s, v in series.items()}


def expected_neighbours(order: dict[str, list]) -> dict[str, tuple[str, str, str]]:
    out = {}
    for ids in order.values():
        for k, i in enumerate(ids):
            out[i] = (ids[max(k - 1, 0)], i, ids[min(k + 1, len(ids) - 1)])
    return out


def hu_of(root, image_id):
    ds = pydicom.dcmread(root / "stage_2_train" / f"{image_id}.dcm")
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_brain3_reads_the_neighbours_in_z_order(built):
    root, meta, cache = built
    truth = expected_neighbours(z_sorted_series(root, meta["path"]))
    ids = list(meta["image_id"])
    np.testing.assert_array_equal(neighbour_ids(meta, ids, (-1, 0, 1)), np.array([truth[i] for i in ids], dtype=object))
    ds = SliceDataset(ids, meta, cache, "brain3", SIDE)
    for n, image_id in enumerate(ids):
        x, y = ds[n]
        assert x.shape == (3, SIDE, SIDE) and x.dtype == torch.float32 and y.shape == (6,)
        for c, neighbour in enumerate(truth[image_id]):
            expected = np.clip((hu_of(root, neighbour) - 0.0) / 80.0, 0, 1)  # brain window 40/80
            np.testing.assert_allclose(x[c].numpy(), expected, atol=1e-6)


def test_meta3_uses_each_slices_header_and_bsb_one_slice(built):
    root, meta, cache = built
    ids = list(meta["image_id"])
    ds = SliceDataset(ids, meta, cache, "meta3", SIDE)
    truth = expected_neighbours(z_sorted_series(root, meta["path"]))
    for n in (0, 3, len(ids) - 1):
        x, _ = ds[n]
        for c, neighbour in enumerate(truth[ids[n]]):
            f = pydicom.dcmread(root / "stage_2_train" / f"{neighbour}.dcm")
            center, width = float(f.WindowCenter[0]), float(f.WindowWidth[0])
            expected = np.clip((hu_of(root, neighbour) - (center - width / 2)) / width, 0, 1)
            np.testing.assert_allclose(x[c].numpy(), expected, atol=1e-6)
    # A missing or degenerate header window falls back to the brain window (40/80).
    odd = meta.copy()
    odd.loc[odd["n_slices"] == 1, "window_width"] = np.nan
    single = int(np.flatnonzero(odd["n_slices"] == 1)[0])
    x, _ = SliceDataset(ids, odd, cache, "meta3", SIDE)[single]
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy(), np.clip(hu_of(root, ids[single]) / 80.0, 0, 1), atol=1e-6)
    bsb = SliceDataset(ids, meta, cache, "bsb", SIDE)
    x, _ = bsb[2]
    hu = hu_of(root, ids[2])
    for c, (center, width) in enumerate([(40, 80), (80, 200), (600, 2800)]):
        np.testing.assert_allclose(x[c].numpy(), np.clip((hu - center + width / 2) / width, 0, 1), atol=1e-6)


def test_one_cache_read_per_distinct_slice(built):
    _, meta, cache = built
    ids = list(meta["image_id"])
    for name, per_item in (("bsb", 1), ("bss_sigmoid", 1), ("bsb3", 3), ("brain3", 3)):
        ds = SliceDataset(ids, meta, cache, name, SIDE)
        single = meta.index[meta["n_slices"] == 1][0]
        middle = meta.index[(meta["slice_index"] == 1) & (meta["n_slices"] > 2)][0]
        before = cache.reads
        ds[int(middle)]
        assert cache.reads - before == per_item, name
        before = cache.reads
        ds[int(single)]  # a one-slice series is its own neighbour: read once
        assert cache.reads - before == 1, name


def test_labels_sizes_and_unknown_combination(built):
    _, meta, cache = built
    ids = list(meta["image_id"])[:5]
    rng = np.random.default_rng(0)
    labels = pd.DataFrame(rng.integers(0, 2, (5, 6)), columns=list(LABELS)).astype(np.int8)
    labels.insert(0, "image_id", ids[::-1])  # another order than the dataset's
    ds = SliceDataset(ids, meta, cache, "bsb", SIDE, labels=labels)
    for n, image_id in enumerate(ids):
        expected = labels.set_index("image_id").loc[image_id, list(LABELS)].to_numpy(np.float32)
        np.testing.assert_array_equal(ds[n][1].numpy(), expected)
    assert (SliceDataset(ids, meta, cache, "bsb", SIDE)[0][1] == 0).all()
    with pytest.raises(ValueError, match="no labels"):
        SliceDataset(ids, meta, cache, "bsb", SIDE, labels=labels.iloc[1:])
    with pytest.raises(KeyError, match="known:"):
        SliceDataset(ids, meta, cache, "rgb", SIDE)
    with pytest.raises(ValueError, match="not in the metadata"):
        SliceDataset(["ID_nothere00"], meta, cache, "bsb", SIDE)
    # A size other than the cache's is resized on the fly.
    small = SliceDataset(ids, meta, cache, "bsb", SIDE // 2)[0][0]
    full = SliceDataset(ids, meta, cache, "bsb", SIDE)[0][0]
    assert small.shape == (3, SIDE // 2, SIDE // 2)
    hu = cache.read_hu(ids[0]).astype(np.float64).reshape(SIDE // 2, 2, SIDE // 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(small[0].numpy(), np.clip((hu - 0.0) / 80.0, 0, 1), atol=1e-5)
    assert full.shape == (3, SIDE, SIDE)


def test_bad_images_are_air_and_bad_neighbours_fall_back(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "comp"
    for z in (0.0, 5.0, 10.0, 15.0):
        write_ct(root / "stage_2_train" / f"ID_00000000{int(z):x}.dcm", rng.integers(900, 1300, (8, 8), dtype=np.uint16), z=z)
    meta = build_metadata(root, tmp_path / "m.parquet", workers=1, progress=False)
    ordered = list(meta.sort_values("slice_index")["image_id"])
    bad = root / "stage_2_train" / f"{ordered[1]}.dcm"
    bad.write_bytes(bad.read_bytes()[:-50])
    build_cache(root, meta, tmp_path / "cache", size=8, workers=1, progress=False)
    cache = ImageCache(tmp_path / "cache")
    assert cached_only(ordered, cache) == [ordered[0], ordered[2], ordered[3]]
    with pytest.warns(UserWarning, match="1 of 4 images are not in the cache"):
        ds = SliceDataset(ordered, meta, cache, "brain3", 8)
    assert ds.n_uncached == 1 and ds.n_neighbour_fallbacks == 2  # slice 0's next and slice 2's previous
    x1, _ = ds[1]
    assert (x1 == 0).all()  # air in every window
    x0, _ = ds[0]
    x2, _ = ds[2]
    own0 = apply_combination("brain", cache.read_hu(ordered[0]).astype(np.float32))[0]
    own2 = apply_combination("brain", cache.read_hu(ordered[2]).astype(np.float32))[0]
    for c in range(3):
        np.testing.assert_array_equal(x0[c].numpy(), own0)  # previous = edge = itself; next is bad = itself
    np.testing.assert_array_equal(x2[0].numpy(), own2)


def test_real_series_neighbours(real_sample, tmp_path):
    meta = build_metadata(real_sample, tmp_path / "m.parquet", workers=1, progress=False)
    build_cache(real_sample, meta, tmp_path / "cache", size=64, workers=1, progress=False)
    cache = ImageCache(tmp_path / "cache")
    truth = expected_neighbours(z_sorted_series(real_sample, meta["path"]))
    ids = list(meta["image_id"])
    np.testing.assert_array_equal(neighbour_ids(meta, ids, (-1, 0, 1)), np.array([truth[i] for i in ids], dtype=object))
    brain3 = SliceDataset(ids, meta, cache, "brain3", 64)
    brain = SliceDataset(ids, meta, cache, "brain", 64)
    position = {i: n for n, i in enumerate(ids)}
    for n in range(0, len(ids), 5):
        x, _ = brain3[n]
        for c, neighbour in enumerate(truth[ids[n]]):
            np.testing.assert_array_equal(x[c].numpy(), brain[position[neighbour]][0][0].numpy())
    # Neighbours stacked as channels share one pixel grid: one box for the series.
    boxes = np.array([brain3.box(n) for n in range(len(ids))])
    assert (boxes == boxes[0]).all() and boxes[0][2] - boxes[0][0] == boxes[0][3] - boxes[0][1]
    # An input, put back on its slice, is that slice (in the brain window, at 64 px detail).
    k = len(ids) // 2
    original = np.clip(read_hu(real_sample / meta["path"].iloc[k]) / 80.0, 0, 1)
    back = to_original(brain[k][0][0].numpy(), brain.box(k), original.shape)
    assert np.corrcoef(back.ravel(), original.ravel())[0, 1] > 0.9


def test_augmentation_is_random_seeded_and_off_at_validation(built):
    _, meta, cache = built
    ids = list(meta["image_id"])
    plain = SliceDataset(ids, meta, cache, "bsb", SIDE)
    aug = SliceDataset(ids, meta, cache, "bsb", SIDE, augment=True)
    np.testing.assert_array_equal(plain[0][0].numpy(), plain[0][0].numpy())
    torch.manual_seed(0)
    runs_a = [aug[n][0] for n in range(len(ids))]
    fresh = SliceDataset(ids, meta, cache, "bsb", SIDE, augment=True)
    torch.manual_seed(0)
    runs_b = [fresh[n][0] for n in range(len(ids))]
    assert all(torch.equal(a, b) for a, b in zip(runs_a, runs_b))  # same seed, same augmentations
    changed = sum(not torch.equal(a, plain[n][0]) for n, a in enumerate(runs_a))
    assert changed >= len(ids) // 2
    for a in runs_a:
        assert a.shape == (3, SIDE, SIDE) and a.is_contiguous() and 0 <= a.min() and a.max() <= 1


def test_dataloader_workers_do_not_repeat_each_other(built):
    _, meta, cache = built
    ids = [meta["image_id"].iloc[0]] * 8
    ds = SliceDataset(ids, meta, cache, "bsb", SIDE, augment=True,
                      augment_config=AugmentConfig(hflip=0, vflip=0, crop=0, affine=1.0, erase=0, brightness_contrast=0))
    torch.manual_seed(1)
    batches = [b for b, _ in DataLoader(ds, batch_size=4, num_workers=2)]
    a, b = batches
    assert not torch.equal(a, b)  # each worker has its own random state
    assert len({x.numpy().tobytes() for x in torch.cat(batches)}) == 8


def test_fast_transforms_match_albumentations():
    img = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    ours, theirs = BrightnessContrast(p=1), A.RandomBrightnessContrast(p=1)
    for alpha, beta in ((1.2, 0.1), (0.8, -0.15)):
        np.testing.assert_allclose(ours.apply(img, alpha=alpha, beta=beta), theirs.apply(img, alpha=alpha, beta=beta), atol=1e-6)
    # Affine's direct cv2 call gives what albumentations' own apply gives.
    rng = np.random.default_rng(1)
    matrix = np.array([[0.95, 0.2, 3.0], [-0.2, 1.05, -2.0], [0, 0, 1]])
    for shape in ((16, 16), (16, 16, 1), (16, 16, 3), (16, 16, 6)):
        hu = rng.uniform(-1000, 2000, shape).astype(np.float32)
        ours = Affine(fill=-1024.0, border_mode=cv2.BORDER_CONSTANT, p=1)
        theirs = A.Affine(fill=-1024.0, border_mode=cv2.BORDER_CONSTANT, p=1)
        np.testing.assert_array_equal(ours.apply(hu, matrix=matrix, output_shape=(16, 16)),
                                      theirs.apply(hu, matrix=matrix, output_shape=(16, 16)))
    # Photometric on C x H x W: one set of holes, shared by every channel; the rest untouched.
    chw = np.ascontiguousarray(img.transpose(2, 0, 1)) + 0.5
    erase = Augmenter(16, AugmentConfig(erase=1.0, erase_holes=(2, 2), erase_size=(0.2, 0.3), brightness_contrast=0),
                      seed=0)
    out = erase.photometric(chw)
    holes = out == 0
    assert out.shape == chw.shape and holes.any() and (holes == holes[0]).all()
    np.testing.assert_array_equal(out[~holes], chw[~holes])
    # The geometric stage fills with air, never clips HU.
    aug = Augmenter(16, AugmentConfig(hflip=0, vflip=0, crop=0, affine=1.0), seed=0)
    hu = np.full((16, 16, 1), 2000.0, np.float32)
    out = aug.geometric(hu)
    assert out.shape == (16, 16, 1) and out.max() == pytest.approx(2000.0) and out.min() >= -1024.0


@pytest.mark.slow  # renders a small synthetic competition (about 5-20 s)
def test_synthetic_competition_neighbours_and_its_truncated_file(tmp_path):
    from competition.synthetic import TRUTH_DIR, generate

    root = generate(tmp_path / "syn", preset="tiny", n_patients=3, seed=0, workers=1, progress=False, positive_rate=1.0)
    meta = build_metadata(root, tmp_path / "m.parquet", workers=1, progress=False)
    build_cache(root, meta, tmp_path / "cache", size=32, workers=2, progress=False)
    cache = ImageCache(tmp_path / "cache")
    series = pd.read_csv(root / TRUTH_DIR / "series.csv", dtype=str, keep_default_na=False)
    truncated = [i for i in series["truncated_image_id"] if i]
    assert len(truncated) == 1 and cache.bad_ids == truncated
    # The generator's own slice order (0 = lowest z) for the series with a bleed.
    index = pd.read_csv(root / TRUTH_DIR / "index.csv")
    assert len(index)
    order = {s: list(g.sort_values("slice_index")["image_id"]) for s, g in index.groupby("series_id")}
    truth = expected_neighbours(order)
    ids = list(truth)
    np.testing.assert_array_equal(neighbour_ids(meta, ids, (-1, 0, 1)), np.array([truth[i] for i in ids], dtype=object))
    with pytest.warns(UserWarning, match="not in the cache"):
        ds = SliceDataset(list(meta["image_id"]), meta, cache, "brain3", 32)
    assert (ds[list(meta["image_id"]).index(truncated[0])][0] == 0).all()


def test_uint8_images_are_the_float_ones_rounded_and_reseeding_repeats_an_augmentation(built):
    from features.dataset import unit_float

    _, meta, cache = built
    ids = list(meta["image_id"])
    floats = SliceDataset(ids, meta, cache, "brain3", SIDE)
    bytes_ = SliceDataset(ids, meta, cache, "brain3", SIDE, as_uint8=True)
    for n in range(len(ids)):
        x, q = floats[n][0].numpy(), bytes_[n][0]
        assert q.dtype == torch.uint8 and q.shape == x.shape
        np.testing.assert_array_equal(q.numpy(), np.rint(x * 255).astype(np.uint8))  # rounded, not truncated
        assert float((unit_float(q) - torch.from_numpy(x)).abs().max()) <= 0.5 / 255 + 1e-7
    aug = SliceDataset(ids, meta, cache, "bsb", SIDE, augment=True)
    aug.reseed(123)
    first = aug[0][0]
    aug.reseed(123)
    assert torch.equal(aug[0][0], first)
    aug.reseed(124)
    assert not torch.equal(aug[0][0], first)
