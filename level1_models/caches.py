"""Which image cache a level-1 model reads, and which caches to build for the models to train.

The rule, in one place (``make prepare`` / ``make cache MODELS=...``, ``CacheDatasets``, prediction):

- A run reads the cache of exactly its input size when that cache exists; else the smallest larger
  one, each slice shrunk on the fly (then it prints one line with what that costs and the command
  that builds its own cache); never a smaller one (``CacheDatasets`` stops instead).
- The caches to build for some specs: the largest size always; a smaller size shares a larger
  cache built anyway when shrinking on the fly costs a loader worker at most 2x and 16 workers
  still feed a GPU at that size (``shares``), else it gets its own. For the zoo: 380-512 px share
  the 512 px cache; 224-300 px get their own (3.3x slower at 256 from 512). Each cache is 54
  to 277 GB at the real size by the cache build's own estimate (``cache_bytes``; the 512 px one
  measured 213 GB).

The figures behind it (``python -m features.bench --only cache-sizes``, 2026-12-05, the 2-core
development machine, no GPU, other helpers' tests running beside it): one loader process, ``brain3``
(previous, current and next slice), augmented, uint8 out, items per CPU-second, 173 slices of a
tiny synthetic competition at 512x512, medians of 7 runs (a second run of 9 agreed within 10%).
From a cache of the input's own size: 629/s at 256 px, 189/s at 384, 105/s at 480, 93/s at 512.
From the 512 px cache: 189/s at 256 (3.3x slower), 99/s at 384 (2.0x), 58/s at 480 (1.8x):
shrinking three 512 px slices (area averaging) costs 3.7 to 7.7 ms an item, most at ratios close
to 1. A GPU takes about 3,000
images/s of resnet50 at 256 px from 16 loader workers (README, ``make gpu-check`` on an H100), so
about 3,000 x (256 / size)^2 at other sizes for so light a backbone (the winners' 480-512 px
EfficientNets take 300-600/s); 16 workers reading 256 px from the 512 px cache make 3,000/s, no
headroom, while 480 from 512 make 930/s, more than such a GPU takes, for ~190 GB less disk
(213 GB x (480/512)^2).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from features.cache import expected_cache_bytes
from level1_models.registry import get_spec

REAL_SLICES = 874_035  # train 752,803 + test 121,232 slices of the real competition (stage 2)
BENCH = "python -m features.bench --only cache-sizes, 2026-12-05, 2-core dev machine, brain3"
# Measured (see the module docstring): items per CPU-second of one loader worker, brain3, augmented.
EXACT_RATE = {256: 629.0, 384: 189.0, 480: 105.0, 512: 93.0}  # from a cache of the input's size
FROM_512_RATE = {256: 189.0, 384: 99.0, 480: 58.0}  # the same inputs from the 512 px cache
GPU_RATE_AT_256 = 3000.0  # images/s one H100 trains resnet50 at 256 px from the loader (README)
LOADER_WORKERS = 16  # loader workers per GPU of that machine
MAX_SLOWDOWN = 2.0  # a shared cache may cost a loader worker at most this (measured: 1.8x at 480 from 512)


def cache_size_for(img_size: int, available: Sequence[int]) -> int:
    """The cache a run of ``img_size`` px reads: that size when built, else the smallest larger one,
    else the largest (smaller than the input: ``CacheDatasets`` refuses it)."""
    if not available:
        raise FileNotFoundError("no image cache; run `make prepare` (it builds the cache) first")
    larger = [s for s in available if s >= img_size]
    return min(larger) if larger else max(available)


def _item_ms(img_size: int, cache_size: int) -> float:
    """Modelled ms of one loader item (brain3, one worker) at ``img_size`` from ``cache_size``:
    the exact-size time (interpolated over the input's pixels) plus, from a larger cache, the
    shrink (measured per ratio of sides, scaled by the cache's pixels)."""
    sizes = sorted(EXACT_RATE)
    exact_ms = [1000 / EXACT_RATE[s] for s in sizes]
    if img_size < sizes[0]:  # below the smallest measured size: in proportion to the pixels
        base = exact_ms[0] * (img_size / sizes[0]) ** 2
    else:
        base = float(np.interp(img_size**2, [s**2 for s in sizes], exact_ms))
    if cache_size <= img_size:
        return base
    targets = sorted(FROM_512_RATE)
    shrink_ms = [1000 / FROM_512_RATE[t] - 1000 / EXACT_RATE[t] for t in targets]
    shrink = float(np.interp(img_size / cache_size, [t / 512 for t in targets], shrink_ms))
    return base + shrink * (cache_size / 512) ** 2


def slowdown(img_size: int, cache_size: int) -> float:
    """How many times longer a loader worker takes per item reading ``cache_size`` px for
    ``img_size`` px than reading a cache of ``img_size`` px (measured at 256/384/480 from 512)."""
    return _item_ms(img_size, cache_size) / _item_ms(img_size, img_size)


def loader_rate(img_size: int, cache_size: int, workers: int = LOADER_WORKERS) -> float:
    """Images/s ``workers`` loader processes make (at this machine's per-core speed)."""
    return workers * 1000 / _item_ms(img_size, cache_size)


def gpu_rate(img_size: int) -> float:
    """Images/s a resnet50-class backbone trains on one H100 at ``img_size`` px (scaled by pixels)."""
    return GPU_RATE_AT_256 * (256 / img_size) ** 2


def shares(img_size: int, cache_size: int) -> bool:
    """Whether a model of ``img_size`` px should read the larger ``cache_size`` px cache rather
    than have its own: shrinking on the fly costs a loader worker at most ``MAX_SLOWDOWN`` and 16
    workers still make what a resnet50-class GPU takes at that size (an upper bound: the
    EfficientNets that read 380-512 px take less)."""
    return cache_size == img_size or (cache_size > img_size and slowdown(img_size, cache_size) <= MAX_SLOWDOWN
                                      and loader_rate(img_size, cache_size) >= gpu_rate(img_size))


def needed_cache_sizes(model_names: Sequence[str]) -> dict[int, list[str]]:
    """Cache size -> the zoo specs that read it, for ``model_names`` (an unknown name raises the
    registry's error, with the close names). Largest first; a size joins the smallest larger cache
    already needed when it ``shares`` it, else it gets its own."""
    sizes: dict[str, int] = {name: get_spec(name).img_size for name in dict.fromkeys(model_names)}
    out: dict[int, list[str]] = {}
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        larger = [c for c in out if c >= size]
        home = min(larger) if larger and shares(size, min(larger)) else size
        out.setdefault(home, []).append(name)
    return out


def cache_bytes(size: int, n_slices: int = REAL_SLICES) -> int:
    """Expected disk bytes of a ``size`` px cache of ``n_slices`` slices (the cache's own estimate)."""
    return expected_cache_bytes(n_slices, size)


def larger_cache_note(model: str, img_size: int, cache_size: int) -> str | None:
    """The one line a run prints when it reads a larger cache than its input (else None)."""
    if cache_size <= img_size:
        return None
    own = (f"its own cache: `make cache CACHE_SIZE={img_size}` (~{cache_bytes(img_size) / 1e9:.0f} GB for the real "
           f"{REAL_SLICES:,} slices)")
    if img_size < min(EXACT_RATE):  # below the measured sizes the model would only extrapolate
        return (f"{model} reads {img_size} px inputs from the {cache_size} px cache, shrinking each slice on the fly, "
                f"which costs the loader time per image (measured 1.8x to 3.3x at 480 to 256 px from 512 px; not "
                f"measured below {min(EXACT_RATE)} px); {own}")
    verdict = ("still more than a GPU takes at this size" if shares(img_size, cache_size)
               else "likely less than a GPU takes at this size")
    return (f"{model} reads {img_size} px inputs from the {cache_size} px cache, shrinking each slice on the fly: "
            f"about {slowdown(img_size, cache_size):.1f}x the loader's time per image (16 workers: "
            f"~{loader_rate(img_size, cache_size):,.0f} images/s, {verdict}; measured {BENCH}); {own}")
