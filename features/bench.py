"""Benchmark of the image pipeline against the naive way, measured in the same run.

`python -m features.bench --data DATA [--work WORK]` prints one line per figure (`name: value unit`):
- cache build rate per core (one process) and with all workers, against a naive build that reads
  each DICOM with pydicom, windows it to `bsb` in float64 numpy and writes an 8-bit PNG, as the
  2019 seed notebooks did;
- cache read rate and bytes per slice, with 16-bit PNG (the alternative format) measured beside it;
- loader rate: augmented 3-channel tensors/s in one process (= per DataLoader worker), against the
  naive loader that reads the DICOM and builds `bsb` in float64 per call, then applies the same
  augmentations with stock albumentations;
- 2.5D: cache reads per item and loader rate for `brain3` and the 9-channel `bsb3`.
Each rate is the median of ``--repeats`` runs; ratios are taken against the baseline's median.
Scratch files go to a temporary folder inside the work folder and are removed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pydicom
import torch

from competition.cli import add_data_args, run_main, work_paths
from features.augment import AugmentConfig
from features.cache import ImageCache, build_cache
from features.dataset import SliceDataset

# Targets from the issue, for this 2-core machine.
TARGET_BUILD_PER_CORE = 250.0
TARGET_LOADER_PER_WORKER = 600.0
TARGET_LOADER_RATIO = 5.0


def median_rate(run: Callable[[], int], repeats: int) -> float:
    """Median over ``repeats`` of items/s, where ``run`` returns the number of items it did."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


# --- the naive way (per call: pydicom, float64, three windows) -----------------------------------
def naive_bsb(path: Path, size: int) -> np.ndarray:
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    channels = []
    for center, width in ((40, 80), (80, 200), (600, 2800)):
        low, high = center - width / 2, center + width / 2
        channels.append((np.clip(hu, low, high) - low) / (high - low))
    image = np.stack(channels, axis=-1)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def naive_build(paths: list[Path], out_dir: Path, size: int) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in paths:
        cv2.imwrite(str(out_dir / f"{p.stem}.png"), (naive_bsb(p, size) * 255).astype(np.uint8))
    return len(paths)


def stock_augment(size: int, cfg: AugmentConfig) -> A.Compose:
    """The same augmentations with stock albumentations classes, on the windowed H x W x 3 image."""
    return A.Compose([
        A.HorizontalFlip(p=cfg.hflip),
        A.VerticalFlip(p=cfg.vflip),
        A.RandomResizedCrop(size=(size, size), scale=cfg.crop_scale, ratio=(0.9, 1.1), p=cfg.crop),
        A.Affine(translate_percent=(-cfg.shift, cfg.shift), scale=cfg.scale, rotate=(-cfg.rotate, cfg.rotate),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=cfg.affine),
        A.RandomBrightnessContrast(brightness_limit=cfg.brightness, contrast_limit=cfg.contrast, p=cfg.brightness_contrast),
        A.CoarseDropout(num_holes_range=cfg.erase_holes, hole_height_range=cfg.erase_size,
                        hole_width_range=cfg.erase_size, fill=0.0, p=cfg.erase),
    ], seed=0)


def naive_loader(paths: list[Path], size: int, augment: A.Compose | None) -> int:
    for p in paths:
        image = naive_bsb(p, size).astype(np.float32)
        if augment is not None:
            image = augment(image=image)["image"]
        torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return len(paths)


def dataset_pass(ds: SliceDataset, limit: int) -> int:
    n = min(len(ds), limit)
    for i in range(n):
        ds[i]
    return n


def png16_figures(cache: ImageCache, ids: list[str], repeats: int) -> tuple[float, float, float]:
    """Bytes/slice, encode and decode rates of the same HU as 16-bit PNG (HU + 1024)."""
    images = [(cache.read_hu(i).astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16) for i in ids]
    encoded: list[np.ndarray] = []

    def encode() -> int:
        encoded[:] = [cv2.imencode(".png", im, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1] for im in images]
        return len(images)

    encode_rate = median_rate(encode, repeats)
    decode_rate = median_rate(lambda: len([cv2.imdecode(e, cv2.IMREAD_UNCHANGED) for e in encoded]), repeats)
    return float(np.mean([e.nbytes for e in encoded])), encode_rate, decode_rate


def run_bench(args: argparse.Namespace) -> None:
    cv2.setNumThreads(1)  # one process = one core, as in a DataLoader worker
    torch.set_num_threads(1)
    paths = work_paths(args)
    if paths.metadata.is_file():
        metadata = pd.read_parquet(paths.metadata)
    else:
        from competition.metadata import build_metadata

        metadata = build_metadata(args.data, paths.metadata, workers=args.workers, progress=False,
                                  bad_files_csv=paths.bad_files)
    # Whole series (so 2.5D neighbours exist), up to --n slices.
    metadata = metadata.sort_values(["series_id", "slice_index"])
    per_series = metadata.groupby("series_id", sort=False).size()
    chosen = per_series.index[(per_series.cumsum() <= args.n) | (np.arange(len(per_series)) == 0)]
    sample = metadata[metadata["series_id"].isin(chosen)].copy()
    files = [Path(args.data) / p for p in sample["path"]]
    shape = f"{int(sample['rows'].median())}x{int(sample['columns'].median())}"
    ids = sample["image_id"].tolist()
    size = args.size
    print(f"bench_slices: {len(sample)} slices ({sample['series_id'].nunique()} series, DICOM {shape} -> {size} px)")
    print(f"bench_repeats: {args.repeats} runs (medians)")

    with tempfile.TemporaryDirectory(dir=paths.root, prefix="bench-") as tmp:
        tmp = Path(tmp)
        runs = iter(range(10**6))

        def build(workers: int) -> int:
            result = build_cache(args.data, sample, tmp / f"cache{next(runs)}", size=size, workers=workers,
                                 progress=False, bad_files_csv=tmp / "bad_files.csv")
            return result["written_now"] + result["bad_now"]

        naive_build(files[:2], tmp / "warm", size)  # first touch of the files: page cache
        build_per_core = median_rate(lambda: build(1), args.repeats)
        base_build = median_rate(lambda: naive_build(files, tmp / f"png{next(runs)}", size), args.repeats)
        build_all = median_rate(lambda: build(args.workers), args.repeats)
        cache_dir = tmp / "cache0"
        cache = ImageCache(cache_dir)
        print(f"cache_format: int16 HU memory map ({size} px)")
        print(f"cache_bytes_per_slice: {size * size * 2} B")
        print(f"cache_build_per_core: {build_per_core:.0f} slices/s")
        print(f"cache_build_{args.workers}_workers: {build_all:.0f} slices/s")
        print(f"baseline_build_per_core: {base_build:.0f} slices/s (pydicom + float64 bsb + 8-bit PNG)")
        print(f"cache_build_vs_baseline: {build_per_core / base_build:.1f} x")

        order = np.random.default_rng(0).permutation(len(ids))
        read_ids = [ids[i] for i in order]
        read_rate = median_rate(lambda: len([cache.read_hu(i) for i in read_ids]), args.repeats)
        png_bytes, png_encode, png_decode = png16_figures(cache, ids[: min(len(ids), 128)], args.repeats)
        print(f"cache_read: {read_rate:.0f} slices/s")
        print(f"png16_bytes_per_slice: {png_bytes:.0f} B (the alternative format, same HU)")
        print(f"png16_encode: {png_encode:.0f} slices/s")
        print(f"png16_read: {png_decode:.0f} slices/s")

        cfg = AugmentConfig()
        loader = {}
        for name, augment in (("bsb", True), ("bsb", False), ("brain3", True), ("bsb3", True)):
            ds = SliceDataset(ids, sample, cache, name, size, augment=augment, augment_config=cfg)
            ds[0]
            loader[name, augment] = median_rate(lambda: dataset_pass(ds, args.loader_n), args.repeats)
            before = cache.reads
            n = dataset_pass(ds, len(ds))
            reads = (cache.reads - before) / n
            tag = "aug" if augment else "noaug"
            print(f"loader_{name}_{tag}_per_worker: {loader[name, augment]:.0f} tensors/s "
                  f"({len(ds.combination)} channels, {reads:.2f} cache reads/item)")
        base_n = min(len(files), args.baseline_n)
        stock = stock_augment(size, cfg)
        base_aug = median_rate(lambda: naive_loader(files[:base_n], size, stock), args.repeats)
        base_plain = median_rate(lambda: naive_loader(files[:base_n], size, None), args.repeats)
        print(f"baseline_loader_bsb_aug_per_worker: {base_aug:.0f} tensors/s (pydicom + float64 bsb per call)")
        print(f"baseline_loader_bsb_noaug_per_worker: {base_plain:.0f} tensors/s")
        print(f"loader_vs_baseline_aug: {loader['bsb', True] / base_aug:.1f} x")
        print(f"loader_vs_baseline_noaug: {loader['bsb', False] / base_plain:.1f} x")

    met = {
        "build_per_core": build_per_core >= TARGET_BUILD_PER_CORE,
        "loader_per_worker": loader["bsb", True] >= TARGET_LOADER_PER_WORKER,
        "loader_vs_baseline": loader["bsb", True] / base_aug >= TARGET_LOADER_RATIO,
    }
    print(f"targets_met: {sum(met.values())}/{len(met)} targets "
          f"(build >= {TARGET_BUILD_PER_CORE:.0f}/s/core {'yes' if met['build_per_core'] else 'NO'}, "
          f"loader >= {TARGET_LOADER_PER_WORKER:.0f}/s/worker {'yes' if met['loader_per_worker'] else 'NO'}, "
          f"loader >= {TARGET_LOADER_RATIO:.0f}x baseline {'yes' if met['loader_vs_baseline'] else 'NO'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.bench", description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=400, help="slices used (whole series, in order)")
    parser.add_argument("--loader-n", type=int, default=400, help="items per timed loader pass")
    parser.add_argument("--baseline-n", type=int, default=100, help="items per timed naive-loader pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    run_bench(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="features.bench"))
