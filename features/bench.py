"""Benchmark of the image pipeline against the naive way, measured in the same run.

`python -m features.bench --data DATA [--work WORK]` prints one line per figure (`name: value unit`):
- cache build rate per core (one process) and with all workers, against a naive build that reads
  each DICOM with pydicom, windows it to `bsb` in float64 numpy and writes an 8-bit PNG, as the
  2019 seed notebooks did;
- cache read rate and bytes per slice, with 16-bit PNG (the alternative format) measured beside it;
- loader rate: augmented 3-channel tensors/s in one process (= per DataLoader worker), against the
  naive loader that reads the DICOM and builds `bsb` in float64 per call, then applies the same
  augmentations with stock albumentations;
- 2.5D: cache reads per item and loader rate for `brain3` and the 9-channel `bsb3`;
- distortion: the loader rate of `brain3` with `distort` 0.5 (one of elastic / grid / optical
  distortion on half the items) against `distort` 0, the rest of the augmentations as the default;
- formats: bytes per slice (stored, and on disk) and the loader rate of the head-cropped cache
  with each codec (lz4, zstd) against the format before them (raw int16 of the whole slice, the v1
  memory map's bytes, read through today's reader), in the same run, alternated;
- cache sizes (``--only cache-sizes`` runs just these): the augmented uint8 loader rate of the
  2.5D stacks (``brain3``, ``bsb3``) at 256, 384 and 480 px read from a cache of exactly that size
  against the 512 px cache shrunk on the fly, alternated, with 512 from 512 as the reference; the
  ratio exact / larger is what reading a larger cache costs (level1_models.caches turns it into
  the rule of which cache a model reads).
Each rate is the median of ``--repeats`` runs. One-process rates are given per CPU-second of the
process (``name``: what one core does, however many other jobs share the machine) and per
wall-clock second (``name_wall``). Our runs and the baseline's alternate so that both see the same
load, and a ratio is the median over those pairs of ours / baseline (per CPU-second). Scratch
files go to a temporary folder inside the work folder and are removed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pydicom
import torch

from competition.cli import add_data_args, run_main, work_paths
from features.augment import AugmentConfig
from features.cache import ImageCache, build_cache, disk_bytes
from features.dataset import SliceDataset
from features.slice_codec import DEFAULT_CODEC

# Targets from the issue, for this 2-core machine.
TARGET_BUILD_PER_CORE = 250.0
TARGET_LOADER_PER_WORKER = 600.0
TARGET_LOADER_RATIO = 5.0
# The cache-sizes figure set: model input sizes read from their own cache vs from LARGE_CACHE.
CACHE_SIZE_TARGETS = (256, 384, 480)
LARGE_CACHE = 512
STACKS = ("brain3", "bsb3")  # the winners' 2.5D inputs: 3 slices, 3 and 9 channels


@dataclass
class Rate:
    cpu: float  # items per CPU-second of this process: what one core does, however busy the machine
    wall: float  # items per wall-clock second


def paired_rates(run_a: Callable[[], int], run_b: Callable[[], int], repeats: int) -> tuple[Rate, Rate, float]:
    """Like median_rate for two runs, alternated so that both see the same machine load; also the
    median over the pairs of a's rate / b's rate (per CPU-second), steadier than a ratio of medians."""
    a, b = [], []
    for _ in range(repeats):
        a.append(median_rate(run_a, 1))
        b.append(median_rate(run_b, 1))
    return _median(a), _median(b), statistics.median(x.cpu / y.cpu for x, y in zip(a, b))


def _median(rates: list[Rate]) -> Rate:
    return Rate(statistics.median(r.cpu for r in rates), statistics.median(r.wall for r in rates))


def show(name: str, rate: Rate, unit: str, note: str = "") -> None:
    """Two lines: the per-core rate (CPU time) and the wall-clock rate of the same runs."""
    print(f"{name}: {rate.cpu:.0f} {unit}" + (f" ({note})" if note else ""))
    print(f"{name}_wall: {rate.wall:.0f} {unit}")


def median_rate(run: Callable[[], int], repeats: int) -> Rate:
    """Median over ``repeats`` of items/s, where ``run`` returns the number of items it did."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        n = run()
        cpu.append(n / max(time.process_time() - c0, 1e-9))
        wall.append(n / (time.perf_counter() - w0))
    return Rate(statistics.median(cpu), statistics.median(wall))


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


def readable_only(sample: pd.DataFrame, data: Path) -> pd.DataFrame:
    """The rows whose DICOM both sides can decode; the others (a truncated file, say) are skipped
    and counted, so a benchmark never stops on a broken file."""
    keep, skipped = [], []
    for rel in sample["path"]:
        try:
            pydicom.dcmread(data / rel).pixel_array
            keep.append(True)
        except Exception as exc:  # any unreadable file: the benchmark measures the readable ones
            keep.append(False)
            skipped.append(f"{rel}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if skipped:
        print(f"bench_skipped: {len(skipped)} unreadable files (first: {skipped[0]})")
    return sample[keep]


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


def compare_formats(caches: dict[str, tuple[ImageCache, str]], ids: list[str], sample: pd.DataFrame, size: int,
                    cfg: AugmentConfig, args: argparse.Namespace) -> None:
    """Bytes per slice and augmented loader rates of cache formats (name -> cache, label) against
    the first one, each pair alternated in one run so that both see the same machine load."""
    for name, (cache, label) in caches.items():
        print(f"format_{name}: {label}")
        print(f"bytes_per_slice_{name}: {cache.lengths.mean():.0f} B stored, "
              f"{disk_bytes(cache.directory) / len(cache.ids):.0f} B on disk")
    (first, (reference, _)), *others = caches.items()
    for combination in ("bsb", "brain3"):
        def loader(cache: ImageCache) -> SliceDataset:
            return SliceDataset(ids, sample, cache, combination, size, augment=True, augment_config=cfg)

        for k, (name, (cache, _)) in enumerate(others):
            a, b = loader(reference), loader(cache)
            rate_a, rate_b, ratio = paired_rates(lambda: dataset_pass(a, args.loader_n),
                                                 lambda: dataset_pass(b, args.loader_n), args.repeats)
            if k == 0:
                show(f"loader_{combination}_aug_per_worker_{first}", rate_a, "tensors/s")
            show(f"loader_{combination}_aug_per_worker_{name}", rate_b, "tensors/s")
            print(f"loader_{combination}_{name}_vs_{first}: {1 / ratio:.2f} x")


def cache_size_figures(data: Path, sample: pd.DataFrame, tmp: Path, args: argparse.Namespace) -> None:
    """Loader rate (augmented, uint8 out, as training reads) of each 2.5D stack at each target
    size from a cache of that size vs from the LARGE_CACHE one (shrunk per slice on the fly)."""
    ids = sample["image_id"].tolist()
    sizes = (*CACHE_SIZE_TARGETS, LARGE_CACHE)
    for size in sizes:
        build_cache(data, sample, tmp / "sizes", size=size, workers=args.workers, progress=False,
                    bad_files_csv=tmp / "bad_files.csv")
    caches = {size: ImageCache(tmp / "sizes", size) for size in sizes}
    print(f"cache_sizes: {', '.join(map(str, CACHE_SIZE_TARGETS))} px, each from its own cache and from the "
          f"{LARGE_CACHE} px one (augmented, uint8 out, one process)")

    def loader(combination: str, cache_size: int, size: int) -> SliceDataset:
        ds = SliceDataset(ids, sample, caches[cache_size], combination, size, augment=True, as_uint8=True)
        ds[0]  # the augmenter and the memory map, outside the timed runs
        return ds

    for combination in STACKS:
        reference = loader(combination, LARGE_CACHE, LARGE_CACHE)
        show(f"loader_{combination}_{LARGE_CACHE}_from_{LARGE_CACHE}",
             median_rate(lambda: dataset_pass(reference, args.loader_n), args.repeats), "tensors/s", "reference")
        for size in CACHE_SIZE_TARGETS:
            exact, larger = loader(combination, size, size), loader(combination, LARGE_CACHE, size)
            rate_exact, rate_larger, ratio = paired_rates(lambda: dataset_pass(exact, args.loader_n),
                                                          lambda: dataset_pass(larger, args.loader_n), args.repeats)
            show(f"loader_{combination}_{size}_from_{size}", rate_exact, "tensors/s")
            show(f"loader_{combination}_{size}_from_{LARGE_CACHE}", rate_larger, "tensors/s")
            print(f"loader_{combination}_{size}_exact_vs_{LARGE_CACHE}: {ratio:.2f} x")


def compare_distort(cache: ImageCache, ids: list[str], sample: pd.DataFrame, size: int, repeats: int,
                    loader_n: int, combination: str = "brain3", p: float = 0.5) -> tuple[Rate, Rate, float]:
    """Augmented loader rates with ``distort`` p against 0 (one process, alternated); prints them
    and returns (with, without, median ratio with / without per CPU-second)."""
    def dataset(distort: float) -> SliceDataset:
        ds = SliceDataset(ids, sample, cache, combination, size, augment=True,
                          augment_config=AugmentConfig(distort=distort))
        ds.reseed(0)
        return ds

    on, off = dataset(p), dataset(0.0)
    on[0], off[0]
    rate_on, rate_off, ratio = paired_rates(lambda: dataset_pass(on, loader_n), lambda: dataset_pass(off, loader_n),
                                            repeats)
    show(f"loader_{combination}_distort{p:g}_per_worker", rate_on, "tensors/s")
    show(f"loader_{combination}_distort0_per_worker", rate_off, "tensors/s")
    print(f"loader_{combination}_distort{p:g}_vs_distort0: {ratio:.2f} x "
          f"({1e3 / rate_on.cpu - 1e3 / rate_off.cpu:.2f} ms more CPU per item)")
    return rate_on, rate_off, ratio


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
    sample = readable_only(metadata[metadata["series_id"].isin(chosen)].copy(), Path(args.data))
    files = [Path(args.data) / p for p in sample["path"]]
    shape = f"{int(sample['rows'].median())}x{int(sample['columns'].median())}"
    ids = sample["image_id"].tolist()
    size = args.size
    print(f"bench_slices: {len(sample)} slices ({sample['series_id'].nunique()} series, DICOM {shape} -> {size} px)")
    print(f"bench_repeats: {args.repeats} runs (medians)")
    # Other jobs on the machine slow the wall-clock rates (and, less, the per-CPU-second ones).
    print(f"machine_load: {os.getloadavg()[0] / (os.cpu_count() or 1):.1f} runnable per core (1-min load average)")

    with tempfile.TemporaryDirectory(dir=paths.root, prefix="bench-") as tmp:
        tmp = Path(tmp)
        if args.only == "cache-sizes":
            cache_size_figures(args.data, sample, tmp, args)
            return
        runs = iter(range(10**6))

        def build(workers: int, codec: str = DEFAULT_CODEC, crop: bool = True, name: str = "") -> int:
            result = build_cache(args.data, sample, tmp / (name or f"cache{next(runs)}"), size=size, workers=workers,
                                 progress=False, bad_files_csv=tmp / "bad_files.csv", codec=codec, crop=crop)
            return result["written_now"] + result["bad_now"]

        naive_build(files, tmp / "warm", size)  # first touch of the files (page cache) for both sides
        build_1, base_build, build_ratio = paired_rates(lambda: build(1), lambda: naive_build(files, tmp / f"png{next(runs)}", size),
                                           args.repeats)
        build_all = median_rate(lambda: build(args.workers), args.repeats)
        cache = ImageCache(tmp / "cache0")
        print(f"cache_format: int16 HU, head crop, {cache.codec} ({size} px)")
        print(f"cache_bytes_per_slice: {cache.lengths.mean():.0f} B (raw {size * size * 2} B)")
        show("cache_build_per_core", build_1, "slices/s")
        show("baseline_build_per_core", base_build, "slices/s", "pydicom + float64 bsb + 8-bit PNG")
        print(f"cache_build_vs_baseline: {build_ratio:.1f} x")
        print(f"cache_build_{args.workers}_workers: {build_all.wall:.0f} slices/s (wall clock)")

        order = np.random.default_rng(0).permutation(len(ids))
        read_ids = [ids[i] for i in order]
        show("cache_read", median_rate(lambda: len([cache.read_hu(i) for i in read_ids]), args.repeats), "slices/s")
        png_bytes, png_encode, png_decode = png16_figures(cache, ids[: min(len(ids), 128)], args.repeats)
        print(f"png16_bytes_per_slice: {png_bytes:.0f} B (the alternative format, same HU)")
        show("png16_encode", png_encode, "slices/s")
        show("png16_read", png_decode, "slices/s")

        cfg = AugmentConfig()
        stock = stock_augment(size, cfg)
        base_n = min(len(files), args.baseline_n)
        loader, base, ratio = {}, {}, {}
        for name, augment in (("bsb", True), ("bsb", False), ("brain3", True), ("bsb3", True)):
            ds = SliceDataset(ids, sample, cache, name, size, augment=augment, augment_config=cfg)
            ds[0]
            if name == "bsb":  # the baseline, interleaved with ours
                loader[name, augment], base[augment], ratio[augment] = paired_rates(
                    lambda: dataset_pass(ds, args.loader_n),
                    lambda: naive_loader(files[:base_n], size, stock if augment else None), args.repeats)
            else:
                loader[name, augment] = median_rate(lambda: dataset_pass(ds, args.loader_n), args.repeats)
            before = cache.reads
            n = dataset_pass(ds, len(ds))
            reads = (cache.reads - before) / n
            tag = "aug" if augment else "noaug"
            show(f"loader_{name}_{tag}_per_worker", loader[name, augment], "tensors/s",
                 f"{len(ds.combination)} channels, {reads:.2f} cache reads/item")
        show("baseline_loader_bsb_aug_per_worker", base[True], "tensors/s", "pydicom + float64 bsb per call")
        show("baseline_loader_bsb_noaug_per_worker", base[False], "tensors/s")
        print(f"loader_vs_baseline_aug: {ratio[True]:.1f} x")
        print(f"loader_vs_baseline_noaug: {ratio[False]:.1f} x")
        compare_distort(cache, ids, sample, size, args.repeats, args.loader_n)
        formats = {"before": ("raw", False, "raw int16 of the whole slice (the v1 format's bytes)")}
        formats |= {codec: (codec, True, f"{codec}, head crop") for codec in ("lz4", "zstd")}
        for name, (codec, crop, _) in formats.items():
            build(1, codec, crop, name)
        compare_formats({name: (ImageCache(tmp / name), label) for name, (_, _, label) in formats.items()},
                        ids, sample, size, cfg, args)
        cache_size_figures(args.data, sample, tmp, args)

    met = {
        f"build >= {TARGET_BUILD_PER_CORE:.0f}/s/core": build_1.cpu >= TARGET_BUILD_PER_CORE,
        f"loader >= {TARGET_LOADER_PER_WORKER:.0f}/s/worker": loader["bsb", True].cpu >= TARGET_LOADER_PER_WORKER,
        f"loader >= {TARGET_LOADER_RATIO:.0f}x baseline": ratio[True] >= TARGET_LOADER_RATIO,
    }
    verdicts = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items())
    print(f"targets_met: {sum(met.values())}/{len(met)} targets ({verdicts})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.bench", description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=400, help="slices used (whole series, in order)")
    parser.add_argument("--loader-n", type=int, default=400, help="items per timed loader pass")
    parser.add_argument("--baseline-n", type=int, default=100, help="items per timed naive-loader pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", choices=("cache-sizes",), default=None,
                        help="just one figure set (cache-sizes: loader rate from an exact vs a larger cache)")
    run_bench(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="features.bench"))
