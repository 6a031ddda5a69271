"""The HU image cache: same HU as the reader, resumable, bad files listed and skipped."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pydicom
import pytest

import features.cache as cache_module
from competition.badfiles import read_bad_files
from competition.dicom import read_hu
from competition.metadata import build_metadata
from dicom_factory import write_ct
from features.cache import (
    BAD, CACHED, ImageCache, build_cache, cached_brain_ratios, expected_cache_bytes, size_dir,
)
from features.crop import to_original
from features.slice_codec import CODECS, DEFAULT_CODEC, EXPECTED_RATIO

N_SLICES = 7
SIDE = 32


def make_dataset(root, rng, n_series=2, side=SIDE, n_slices=N_SLICES):
    """n_series series of 12-bit unsigned slices (intercept -1024), z in no file-name order."""
    for s in range(n_series):
        zs = rng.permutation(n_slices) * 5.0 - 20.0
        for z in zs:
            image_id = f"ID_{rng.integers(0, 16**9):09x}"
            write_ct(root / "stage_2_train" / f"{image_id}.dcm", rng.integers(0, 4096, (side, side), dtype=np.uint16),
                     series=f"ID_00000000s{s}", study=f"ID_000000000{s}", z=float(z))
    return root


@pytest.fixture()
def data(tmp_path):
    return make_dataset(tmp_path / "comp", np.random.default_rng(0))


def metadata_of(root, tmp_path):
    return build_metadata(root, tmp_path / "work" / "metadata.parquet", workers=1, progress=False)


@pytest.mark.parametrize("codec", CODECS)
def test_cache_holds_the_readers_hu(data, tmp_path, codec):
    meta = metadata_of(data, tmp_path)
    cache_dir = tmp_path / "work" / "cache"
    result = build_cache(data, meta, cache_dir, size=SIDE, workers=1, progress=False, codec=codec)
    assert result["cached"] == len(meta) == result["written_now"] and result["bad"] == 0
    # Random 12-bit noise: compression saves little or nothing (then the slice is stored raw).
    assert result["bytes_per_slice"] <= SIDE * SIDE * 2 and (codec != "raw" or result["bytes_per_slice"] == SIDE * SIDE * 2)
    cache = ImageCache(cache_dir)
    assert cache.codec == codec
    assert cache.size == SIDE and len(cache) == len(meta)
    for row in meta.itertuples():
        ds = pydicom.dcmread(data / row.path)  # independent HU: raw * slope + intercept
        expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        got = cache.read_hu(row.image_id)
        assert got.shape == (SIDE, SIDE) and got.dtype == np.int16
        np.testing.assert_array_equal(got, np.clip(expected, -1024, None))
        assert row.image_id in cache


def test_smaller_size_is_the_area_mean(data, tmp_path):
    meta = metadata_of(data, tmp_path)
    build_cache(data, meta, tmp_path / "cache", size=SIDE // 2, workers=1, progress=False)
    cache = ImageCache(tmp_path / "cache")
    for row in meta.head(4).itertuples():
        hu = np.clip(read_hu(data / row.path).astype(np.float64), -1024, None)
        block_mean = hu.reshape(SIDE // 2, 2, SIDE // 2, 2).mean(axis=(1, 3))
        assert np.abs(cache.read_hu(row.image_id) - block_mean).max() <= 0.5 + 1e-6  # rounding to int16


def test_real_sample_at_256_uncropped(real_sample, tmp_path):
    meta = build_metadata(real_sample, tmp_path / "metadata.parquet", workers=1, progress=False)
    result = build_cache(real_sample, meta, tmp_path / "cache", size=256, workers=2, progress=False, crop=False)
    cache = ImageCache(tmp_path / "cache")
    assert len(cache) == len(meta) == 32
    assert result["bytes_per_slice"] < EXPECTED_RATIO[DEFAULT_CODEC] * 256 * 256 * 2  # as expected_cache_bytes says
    for row in meta.head(3).itertuples():
        hu = np.clip(read_hu(real_sample / row.path).astype(np.float64), -1024, None)
        assert hu.shape == (512, 512)
        block_mean = hu.reshape(256, 2, 256, 2).mean(axis=(1, 3))
        assert np.abs(cache.read_hu(row.image_id) - block_mean).max() <= 0.5 + 1e-6
        assert (cache.box(row.image_id) == [0, 0, 512, 512]).all()


def test_real_sample_cropped_to_its_head(real_sample, tmp_path):
    meta = build_metadata(real_sample, tmp_path / "metadata.parquet", workers=1, progress=False)
    result = build_cache(real_sample, meta, tmp_path / "cache", size=256, workers=1, progress=False)
    cache = ImageCache(tmp_path / "cache")
    boxes = cache.boxes_of(meta["image_id"])
    assert (boxes == boxes[0]).all()  # one box for the series
    y0, x0, y1, x1 = boxes[0]
    assert y1 - y0 == x1 - x0 < 512 and result["bytes_per_slice"] < EXPECTED_RATIO[DEFAULT_CODEC] * 256 * 256 * 2
    assert expected_cache_bytes(32, 256) >= result["data_bytes"] > 32 * result["bytes_per_slice"]
    for row in meta.itertuples():
        hu = np.clip(read_hu(real_sample / row.path), -1024, None)
        # Every tissue pixel of every slice is inside the box.
        ys, xs = np.nonzero(hu > -500)
        inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
        assert inside.mean() > 0.995, row.image_id  # the table's edge, below the head, falls outside
        assert (ys[~inside] >= y1).all()
        back = to_original(cache.read_hu(row.image_id), boxes[0], hu.shape, fill=-1024)
        region = (slice(max(y0, 0), min(y1, 512)), slice(max(x0, 0), min(x1, 512)))
        assert np.median(np.abs(back[region] - hu[region])) < 40  # resampled twice, same anatomy


def test_bad_files_are_listed_and_skipped(data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK", 3)  # several tasks, so the process pool is used
    meta = metadata_of(data, tmp_path)
    truncated, vanished = meta["image_id"].iloc[2], meta["image_id"].iloc[5]
    path = data / meta["path"].iloc[2]
    path.write_bytes(path.read_bytes()[:-100])  # header intact, pixel data cut short
    (data / meta["path"].iloc[5]).unlink()  # deleted after the metadata pass
    cache_dir = tmp_path / "work" / "cache"
    result = build_cache(data, meta, cache_dir, size=SIDE, workers=2, progress=False)
    assert result["bad"] == 2 and result["cached"] == len(meta) - 2
    listed = pd.read_csv(result["bad_files_csv"])
    assert sorted(listed["image_id"]) == sorted([truncated, vanished])
    assert listed.set_index("image_id").loc[truncated, "reason"].startswith("pixel data cannot be decoded")
    shared = read_bad_files(tmp_path / "work" / "bad_files.csv")  # next to the cache: WorkPaths.bad_files
    assert sorted(shared["image_id"]) == sorted([truncated, vanished]) and set(shared["stage"]) == {f"cache_{SIDE}px"}
    cache = ImageCache(cache_dir)
    assert truncated not in cache and vanished not in cache and sorted(cache.bad_ids) == sorted([truncated, vanished])
    with pytest.raises(KeyError, match="listed as bad"):
        cache.read_hu(truncated)
    assert (cache.rows_of([truncated, meta["image_id"].iloc[0], "ID_unknown"]) == [-1, cache.row(meta["image_id"].iloc[0]), -1]).all()
    # A rerun does not try them again, and keeps them listed.
    again = build_cache(data, meta, cache_dir, size=SIDE, workers=1, progress=False)
    assert again["written_now"] == 0 and again["bad_now"] == 0 and again["bad"] == 2
    assert len(pd.read_csv(again["bad_files_csv"])) == 2


def _interrupt_on_row_10(*args):
    """Stands in for the worker function: Ctrl-C while caching the task that holds row 10 (the
    second series: a task holds whole series)."""
    if any(row == 10 for rows, _ in args[-1] for row, _ in rows):
        raise KeyboardInterrupt
    return _real_cache_chunk(*args)


_real_cache_chunk = cache_module._cache_chunk


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_pass_resumes(data, tmp_path, monkeypatch, workers):
    meta = metadata_of(data, tmp_path)
    monkeypatch.setattr(cache_module, "CHUNK", 3)
    # Forked pool workers inherit the patched module, so the interrupt also happens inside them.
    monkeypatch.setattr(cache_module, "_cache_chunk", _interrupt_on_row_10)
    with pytest.raises(KeyboardInterrupt):
        build_cache(data, meta, tmp_path / "cache", size=SIDE, workers=workers, progress=False)
    monkeypatch.setattr(cache_module, "_cache_chunk", _real_cache_chunk)
    partial = ImageCache(tmp_path / "cache")
    assert N_SLICES <= len(partial) < len(meta) and partial.ids[10] not in partial
    result = build_cache(data, meta, tmp_path / "cache", size=SIDE, workers=workers, progress=False)
    assert result["already_done"] == len(partial) and result["written_now"] == len(meta) - len(partial)
    cache = ImageCache(tmp_path / "cache")
    for row in meta.itertuples():
        np.testing.assert_array_equal(cache.read_hu(row.image_id), np.clip(np.rint(read_hu(data / row.path)), -1024, None))


def test_new_images_are_appended_and_workers_agree(data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK", 3)  # several tasks, so the process pool is used
    meta = metadata_of(data, tmp_path)
    first, rest = meta.iloc[:5], meta
    build_cache(data, first, tmp_path / "one", size=SIDE // 2, workers=1, progress=False)
    result = build_cache(data, rest, tmp_path / "one", size=SIDE // 2, workers=1, progress=False)
    assert result["already_done"] == 5 and result["written_now"] == len(meta) - 5
    build_cache(data, meta, tmp_path / "two", size=SIDE // 2, workers=2, progress=False)
    one, two = ImageCache(tmp_path / "one"), ImageCache(tmp_path / "two")
    for image_id in meta["image_id"]:
        np.testing.assert_array_equal(one.read_hu(image_id), two.read_hu(image_id))
    # Rows follow series and z order, so 2.5D neighbours are adjacent on disk.
    ordered = meta.sort_values(["split", "series_id", "slice_index"])["image_id"].tolist()
    assert two.ids == ordered


def test_image_cache_pickles_small_and_names_its_errors(data, tmp_path):
    meta = metadata_of(data, tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m features cache"):
        ImageCache(tmp_path / "cache")
    build_cache(data, meta, tmp_path / "cache", size=SIDE, workers=1, progress=False)
    build_cache(data, meta, tmp_path / "cache", size=SIDE // 2, workers=1, progress=False)
    with pytest.raises(ValueError, match="pass size="):
        ImageCache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="--size 64"):
        ImageCache(tmp_path / "cache", size=64)
    assert ImageCache.for_size(tmp_path / "cache", SIDE // 2).size == SIDE // 2
    assert ImageCache.for_size(tmp_path / "cache", SIDE // 2 + 1).size == SIDE
    assert ImageCache.for_size(tmp_path / "cache", 4 * SIDE).size == SIDE
    with pytest.raises(FileNotFoundError, match="build it"):
        ImageCache.for_size(tmp_path / "nothing", SIDE)
    cache = ImageCache(tmp_path / "cache", size=SIDE)
    image_id = meta["image_id"].iloc[0]
    before = cache.read_hu(image_id)
    blob = pickle.dumps(cache)
    assert len(blob) < 20_000  # the memory map is reopened, not copied
    np.testing.assert_array_equal(pickle.loads(blob).read_hu(image_id), before)
    status = np.fromfile(size_dir(tmp_path / "cache", SIDE) / "status.uint8", dtype=np.uint8)
    assert set(status) == {CACHED} and BAD not in status


def test_cli_builds_the_cache_and_resumes(data, tmp_path, capsys):
    from features.__main__ import main

    work = tmp_path / "work"
    assert main(["cache", "--data", str(data), "--work", str(work), "--size", "16", "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{2 * N_SLICES} slices at 16 px ({2 * N_SLICES} now, 0 already there), " in out and f"bytes/slice ({DEFAULT_CODEC})" in out
    assert (work / "metadata.parquet").is_file() and len(ImageCache(work / "cache")) == 2 * N_SLICES
    main(["cache", "--data", str(data), "--work", str(work), "--size", "16", "--no-progress"])
    assert f"(0 now, {2 * N_SLICES} already there)" in capsys.readouterr().out


@pytest.mark.slow  # times several passes
def test_bench_prints_every_figure(data, tmp_path, capsys):
    from features.bench import main

    assert main(["--data", str(data), "--work", str(tmp_path / "work"), "--size", "32", "--repeats", "1",
                 "--loader-n", "8", "--baseline-n", "4", "--workers", "2"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for name in ("cache_build_per_core", "baseline_build_per_core", "cache_build_vs_baseline", "cache_read",
                 "loader_bsb_aug_per_worker", "baseline_loader_bsb_aug_per_worker", "loader_vs_baseline_aug",
                 "loader_brain3_aug_per_worker", "cache_bytes_per_slice", "targets_met", "bytes_per_slice_before",
                 "bytes_per_slice_lz4", "bytes_per_slice_zstd", "loader_bsb_aug_per_worker_before",
                 "loader_bsb_aug_per_worker_lz4", "loader_bsb_aug_per_worker_zstd", "loader_brain3_zstd_vs_before",
                 "loader_bsb_lz4_vs_before", "loader_brain3_distort0.5_per_worker",
                 "loader_brain3_distort0_per_worker", "loader_brain3_distort0.5_vs_distort0"):
        assert name in lines, name
    assert 0 < float(lines["cache_bytes_per_slice"].split()[0]) <= 2048
    assert "3.00 cache reads/item" not in lines["loader_bsb_aug_per_worker"] and "1.00 cache reads/item" in lines["loader_bsb_aug_per_worker"]
    assert not list((tmp_path / "work").glob("bench-*"))  # scratch removed


def write_phantom_series(root, series, n, shape=(64, 48), table_row=58):
    """A head (40 HU ellipse) growing then shrinking over n slices, with a table below it."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ids = []
    for k in range(n):
        ry, rx = 8 + 12 * np.sin(np.pi * (k + 1) / (n + 1)), 6 + 10 * np.sin(np.pi * (k + 1) / (n + 1))
        hu = np.full(shape, -1000, dtype=np.int32)
        hu[((yy - 28) / ry) ** 2 + ((xx - 22) / rx) ** 2 <= 1] = 40
        hu[table_row : table_row + 2] = 200
        image_id = f"ID_{series[-4:]}{k:05d}"
        write_ct(root / "stage_2_train" / f"{image_id}.dcm", (hu + 1024).astype(np.uint16), series=series, z=float(k))
        ids.append(image_id)
    return ids


def test_one_square_head_box_per_series_no_stretch(tmp_path):
    root = tmp_path / "comp"
    ids = write_phantom_series(root, "ID_0000ser1", 5)
    meta = metadata_of(root, tmp_path)
    hus = {i: np.clip(read_hu(root / "stage_2_train" / f"{i}.dcm"), -1024, None) for i in ids}
    # Brute force: the union of the head pixels (40 HU, not the 200 HU table) over the series.
    ys, xs = np.nonzero(np.any([np.abs(h - 40) < 1 for h in hus.values()], axis=0))
    head = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    build_cache(root, meta, tmp_path / "probe", size=16, workers=1, progress=False)
    box = ImageCache(tmp_path / "probe").box(ids[0])
    y0, x0, y1, x1 = box.tolist()
    side = y1 - y0
    assert side == x1 - x0 and y0 <= head[0] - 1 and x0 <= head[1] - 1 and y1 >= head[2] + 1 and x1 >= head[3] + 1
    assert y1 <= 58 + 1  # the table is left out
    # At size == side nothing is resampled: the cache holds the box's pixels, air outside the slice.
    build_cache(root, meta, tmp_path / "cache", size=side, workers=1, progress=False)
    cache = ImageCache(tmp_path / "cache")
    for i in ids:
        assert (cache.box(i) == box).all()
        padded = np.pad(hus[i], side, constant_values=-1024)[y0 + side : y1 + side, x0 + side : x1 + side]
        np.testing.assert_array_equal(cache.read_hu(i), padded)
        np.testing.assert_array_equal(to_original(cache.read_hu(i), box, hus[i].shape)[max(y0, 0):y1, max(x0, 0):x1],
                                      hus[i][max(y0, 0):y1, max(x0, 0):x1])
    assert (cache.boxes_of([ids[0], "ID_unknown"])[1] == -1).all()


def test_non_square_slice_is_padded_not_stretched(tmp_path):
    root = tmp_path / "comp"
    stored = np.random.default_rng(4).integers(0, 4096, (40, 20), dtype=np.uint16)
    write_ct(root / "stage_2_train" / "ID_00000wide.dcm", stored)
    meta = metadata_of(root, tmp_path)
    build_cache(root, meta, tmp_path / "cache", size=40, workers=1, progress=False, crop=False)
    cache = ImageCache(tmp_path / "cache")
    got = cache.read_hu("ID_00000wide")
    assert (cache.box("ID_00000wide") == [0, -10, 40, 30]).all()
    np.testing.assert_array_equal(got[:, 10:30], stored.astype(np.int16) - 1024)
    assert (got[:, :10] == -1024).all() and (got[:, 30:] == -1024).all()
    build_cache(root, meta, tmp_path / "half", size=20, workers=1, progress=False, crop=False)
    block_mean = np.pad(stored.astype(np.float64) - 1024, ((0, 0), (10, 10)), constant_values=-1024)
    block_mean = block_mean.reshape(20, 2, 20, 2).mean(axis=(1, 3))
    assert np.abs(ImageCache(tmp_path / "half").read_hu("ID_00000wide") - block_mean).max() <= 0.5 + 1e-6


def test_appended_slices_reuse_their_series_box(tmp_path):
    root = tmp_path / "comp"
    ids = write_phantom_series(root, "ID_0000ser2", 6)
    meta = metadata_of(root, tmp_path)
    small = meta[meta["image_id"].isin(ids[:2])]  # the two smallest heads first
    build_cache(root, small, tmp_path / "cache", size=16, workers=1, progress=False)
    first_box = ImageCache(tmp_path / "cache").box(ids[0])
    build_cache(root, meta, tmp_path / "alone", size=16, workers=1, progress=False)
    assert not (ImageCache(tmp_path / "alone").box(ids[0]) == first_box).all()  # the whole series' box is larger
    result = build_cache(root, meta, tmp_path / "cache", size=16, workers=1, progress=False)
    assert result["written_now"] == 4
    assert (ImageCache(tmp_path / "cache").boxes_of(ids) == first_box).all()  # one pixel grid for the series


def test_old_format_and_other_codec_are_refused(data, tmp_path):
    meta = metadata_of(data, tmp_path)
    old = size_dir(tmp_path / "old", SIDE)
    old.mkdir(parents=True)
    (old / "info.json").write_text('{"format": "int16-hu-memmap-v1", "size": 32, "dtype": "int16", "rows": 14}')
    for attempt in (lambda: build_cache(data, meta, tmp_path / "old", size=SIDE, workers=1, progress=False),
                    lambda: ImageCache(tmp_path / "old")):
        with pytest.raises(ValueError, match=r"another format \(int16-hu-memmap-v1.*delete .*make cache CACHE_SIZE=32"):
            attempt()
    build_cache(data, meta, tmp_path / "cache", size=SIDE, workers=1, progress=False, codec="raw")
    with pytest.raises(ValueError, match=f"built with codec raw, not {DEFAULT_CODEC}"):
        build_cache(data, meta, tmp_path / "cache", size=SIDE, workers=1, progress=False)
    with pytest.raises(ValueError, match="was built with the head crop; build it the same way"):
        build_cache(data, meta, tmp_path / "cache", size=SIDE, workers=1, progress=False, codec="raw", crop=False)


def test_expected_size_is_printed_before_the_build(data, tmp_path, capsys):
    meta = metadata_of(data, tmp_path)
    result = build_cache(data, meta, tmp_path / "cache", size=SIDE, workers=1, progress=True, codec="raw")
    err = capsys.readouterr().err
    expected = expected_cache_bytes(len(meta), SIDE, "raw")
    assert f"{len(meta):,} slices to write" in err and f"expected {expected / 1e9:.2f} GB" in err
    assert expected == len(meta) * (SIDE * SIDE * 2 + 41)
    assert result["data_bytes"] <= expected + 7 * 4096  # raw: exact, give or take a block per small file
    assert expected_cache_bytes(870_000, 512, "raw") / 1e9 == pytest.approx(456, abs=1)
    assert expected_cache_bytes(10, 256) < expected_cache_bytes(10, 256, worst_case=True) == expected_cache_bytes(10, 256, "raw")
    build_cache(data, meta, tmp_path / "cache", size=SIDE, workers=1, progress=True, codec="raw")
    assert "to write" not in capsys.readouterr().err  # nothing to do, nothing announced


# --- brain ratio: the share of the head's pixels in the brain window, per slice ----------------

EDGE_HU = [-1024, -1000, -501, -500, -499, -1, 0, 1, 40, 79, 80, 81, 300, 2000]  # both thresholds and both window edges


def write_brain_series(root, rng, series="ID_0000brn1", n=6, side=24):
    """Slices of HU drawn from the thresholds' edges, each slice its own mix; the last one all air."""
    ids = []
    for k in range(n):
        hu = rng.choice(EDGE_HU, size=(side, side), p=rng.dirichlet(np.ones(len(EDGE_HU))))
        hu = np.full((side, side), -1024) if k == n - 1 else hu
        image_id = f"ID_{series[-4:]}{k:05d}"
        write_ct(root / "stage_2_train" / f"{image_id}.dcm", (hu + 1024).astype(np.uint16), series=series, z=float(k))
        ids.append(image_id)
    return ids


def brute_brain_ratio(path):
    """Pixel by pixel over pydicom's HU: brain window [0, 80] HU over the head (above -500 HU)."""
    ds = pydicom.dcmread(path)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    head = brain = 0
    for value in ds.pixel_array.ravel().tolist():
        hu = value * slope + intercept
        head += hu > -500
        brain += 0 <= hu <= 80
    return brain / head if head else 0.0


def test_brain_ratio_is_the_brute_force_share_of_pydicom_hu(tmp_path):
    root = tmp_path / "comp"
    ids = write_brain_series(root, np.random.default_rng(7))
    meta = metadata_of(root, tmp_path)
    build_cache(root, meta, tmp_path / "cache", size=16, workers=1, progress=False)
    build_cache(root, meta, tmp_path / "cache", size=8, workers=1, progress=False, codec="raw")
    expected = np.array([brute_brain_ratio(root / "stage_2_train" / f"{i}.dcm") for i in ids])
    assert expected[-1] == 0 and (expected[:-1] > 0).all() and len(set(expected.round(6))) == len(ids)
    got = ImageCache(tmp_path / "cache", 16).brain_ratios([*ids, "ID_unknown"])
    assert got.dtype == np.float32 and np.isnan(got[-1])
    np.testing.assert_allclose(got[:-1], expected, rtol=1e-6)
    np.testing.assert_allclose(cached_brain_ratios(tmp_path / "cache", ids), expected, rtol=1e-6)  # any size: the same


def test_a_cache_built_before_brain_ratios_stays_without_them(tmp_path):
    root = tmp_path / "comp"
    ids = write_brain_series(root, np.random.default_rng(8))
    meta = metadata_of(root, tmp_path)
    build_cache(root, meta[meta["image_id"].isin(ids[:3])], tmp_path / "cache", size=16, workers=1, progress=False)
    brain_file = size_dir(tmp_path / "cache", 16) / "brain_ratio.float32"
    brain_file.unlink()  # as an older version left it
    build_cache(root, meta, tmp_path / "cache", size=16, workers=1, progress=False)  # extended with the rest
    assert not brain_file.exists() and len(ImageCache(tmp_path / "cache")) == len(ids)
    assert cached_brain_ratios(tmp_path / "cache", ids) is None
    with pytest.raises(KeyError, match="no brain ratios"):
        ImageCache(tmp_path / "cache").brain_ratios(ids)
