"""The image cache: every slice's Hounsfield units, cropped to the head, squared, resized once,
served without reading a DICOM.

Format ``FORMAT``, one folder per size, ``<cache_dir>/<size>px/``:
- ``ids.txt``: the image id of each row. Rows follow the series and slice order of the metadata,
  so the slices a 2.5D input reads together lie next to each other on disk.
- ``status.uint8``: per row 0 to do, 1 cached, 2 bad. It makes the pass resumable: a rerun does
  only the rows still to do, and new images in the metadata are appended.
- ``boxes.int32``: per row the square (y0, x0, y1, x1) cut from the slice, in its own pixels
  (``features.crop``: the head of the whole series plus a margin, padded with air to a square).
  ``features.crop.to_original`` maps a map made on the cached image back onto the slice.
- ``brain_ratio.float32``: per row the share of the slice's head pixels that lie in the brain
  window (:func:`brain_ratio`), a level-2 feature (11th place's). Computed on the slice as read,
  before the crop and resize, so `make predict` computes the same value from the same HU. A cache
  built before this file existed has none (and gets none when extended): level 2 then goes without.
- ``slices.bin`` and ``lengths.uint32``: row r's slice, encoded by ``features.slice_codec``, is the
  first ``lengths[r]`` bytes of a slot of size x size x 2 bytes. Slots are allocated sparse, so a
  compressed slice takes only the disk pages it fills, and workers write their rows in place.
- ``info.json`` (format, size, codec, crop rule, rows) and ``bad_files.csv``; bad files are also
  listed in the work folder's shared bad-files list (stage ``cache_<size>px``).

HU are rounded to integers and clipped below at -1024 (air): values below air are padding outside
the scanner's field of view; no window looks below it. Measured choices (``python -m
features.bench``, README): lz4 on byte planes (the default) about halves the disk and costs the
loader a decode of ~0.07 ms per 256 px slice; zstd saves a fifth more disk at twice that decode;
raw rows are one copy out of the memory map.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from competition.progress import progress_bar

from competition.atomic import write_csv
from competition.badfiles import record_bad_files
from competition.diskspace import check_free_space
from competition.pools import worker_pool
from features import crop as crop_rule
from features.slice_codec import CODECS, DEFAULT_CODEC, EXPECTED_RATIO, decode, encode, raw_bytes

FORMAT = "int16-hu-square-crop-v2"  # v1 ("int16-hu-memmap-v1"): whole slice stretched, raw memory map
DTYPE = np.dtype(np.int16)
HU_MIN = -1024  # air; lower values (padding outside the field of view) are stored as air
HU_MAX = int(np.iinfo(np.int16).max)
DEFAULT_SIZE = 256
CHUNK = 64  # slices per task handed to a worker process (whole series, so a task may hold more)
PAGE = 4096  # disk block: a compressed slice's last one is filled on average half
ROW_FILES_BYTES = 1 + 4 + 16 + 4 + 16  # status, length, box, brain ratio and id of one row
# The brain window (centre 40, width 80: the competition's reading window): grey and white matter,
# blood and CSF; bone, fat and air lie outside. Shared by the head's pixels (above crop.BODY_HU),
# not by the whole slice, so the figure does not change with the field of view or the pixel size.
BRAIN_HU = (0.0, 80.0)
BRAIN_FILE = "brain_ratio.float32"

TODO, CACHED, BAD = 0, 1, 2


def size_dir(cache_dir: Path | str, size: int) -> Path:
    return Path(cache_dir) / f"{size}px"


def expected_cache_bytes(n_slices: int, size: int, codec: str = DEFAULT_CODEC, *, worst_case: bool = False) -> int:
    """Disk bytes ``n_slices`` cached at ``size`` px take: expected (codec "raw" is exact), or at
    most (``worst_case``: every slice incompressible, as raw)."""
    slot = raw_bytes(size)
    per_slice = slot if worst_case or codec == "raw" else min(slot, EXPECTED_RATIO[codec] * slot + PAGE / 2)
    return int(n_slices * (per_slice + ROW_FILES_BYTES))


def resize_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """Square HU image -> size x size float32 (area averaging when shrinking, bilinear when growing)."""
    if hu.shape == (size, size):
        return hu.astype(np.float32, copy=False)
    shrink = hu.shape[0] >= size and hu.shape[1] >= size
    return cv2.resize(
        hu.astype(np.float32, copy=False), (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


def brain_ratio(hu: np.ndarray) -> float:
    """Share of the head's pixels (HU above ``crop.BODY_HU``) within ``BRAIN_HU`` (inclusive); 0 for a
    slice of air. Low at the skull base and the vertex (bone, scalp), high mid-brain."""
    head = hu > crop_rule.BODY_HU
    n_head = int(np.count_nonzero(head))
    if not n_head:
        return 0.0
    return float(np.count_nonzero((hu >= BRAIN_HU[0]) & (hu <= BRAIN_HU[1])) / n_head)


def to_stored(hu: np.ndarray, size: int, box: np.ndarray | None = None) -> np.ndarray:
    """What the cache stores for one HU image: clipped, cut to ``box`` (default: the whole slice,
    padded to a square with air), resized, rounded to int16."""
    hu = np.clip(hu, HU_MIN, HU_MAX, dtype=np.float32)
    box = crop_rule.square_box(None, hu.shape) if box is None else box
    return np.rint(resize_hu(crop_rule.cut_square(hu, box, HU_MIN), size)).astype(DTYPE)


class _Store:
    """The files of one size (see the module docstring)."""

    def __init__(self, directory: Path, size: int):
        self.dir, self.size = directory, size
        self.ids_path = directory / "ids.txt"
        self.status_path = directory / "status.uint8"
        self.data_path = directory / "slices.bin"
        self.lengths_path = directory / "lengths.uint32"
        self.boxes_path = directory / "boxes.int32"
        self.brain_path = directory / BRAIN_FILE
        self.info_path = directory / "info.json"
        self.bad_path = directory / "bad_files.csv"

    @property
    def slot_bytes(self) -> int:
        return raw_bytes(self.size)

    def read_ids(self) -> list[str]:
        return self.ids_path.read_text().split() if self.ids_path.is_file() else []

    def info(self) -> dict:
        return json.loads(self.info_path.read_text()) if self.info_path.is_file() else {}

    def open(self, name: str, mode: str = "r") -> np.memmap:
        """The per-row file ``name`` (data, lengths or boxes) as a memory map over every row."""
        n = len(self.read_ids())
        path, dtype, shape = {
            "data": (self.data_path, np.uint8, (n, self.slot_bytes)),
            "lengths": (self.lengths_path, np.uint32, (n,)),
            "boxes": (self.boxes_path, np.int32, (n, 4)),
            "brain": (self.brain_path, np.float32, (n,)),
        }[name]
        return np.memmap(path, dtype=dtype, mode=mode, shape=shape)

    def extend(self, new_ids: Sequence[str], codec: str, crop: bool) -> None:
        """Append rows for ``new_ids``: ids, to-do statuses, and room in the per-row files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        n_old = len(self.read_ids())
        # A new cache gets brain ratios; an old one without them stays so (its cached rows have none).
        brain = n_old == 0 or self.brain_path.is_file()
        with self.ids_path.open("a") as f:
            f.writelines(f"{i}\n" for i in new_ids)
        n = n_old + len(new_ids)
        with self.status_path.open("ab") as f:  # real zeros (to do), not sparse: the builder's mapped
            f.write(bytes(n - f.tell()))  # status writes then cannot die with SIGBUS on a full disk
        row_files = [(self.lengths_path, 4), (self.boxes_path, 16), (self.data_path, self.slot_bytes)]
        for path, row_bytes in row_files + ([(self.brain_path, 4)] if brain else []):
            with path.open("ab") as f:
                f.truncate(n * row_bytes)  # sparse: no disk used until a row is filled
        rule = {"body_hu": crop_rule.BODY_HU, "margin": crop_rule.MARGIN, "min_side": crop_rule.MIN_SIDE} if crop else None
        self.info_path.write_text(json.dumps({
            "format": FORMAT, "size": self.size, "dtype": DTYPE.name, "hu_min": HU_MIN, "rows": n, "codec": codec,
            "crop": rule, "boxes": "boxes.int32: rows x (y0, x0, y1, x1), the square cut from each slice, in its pixels",
            **({"brain_ratio": f"brain_ratio.float32: rows, share of the head's pixels (HU > {crop_rule.BODY_HU:g}) "
                               f"in {list(BRAIN_HU)} HU, on the slice before the crop"} if brain else {}),
        }, indent=1))

    def check_info(self, codec: str | None = None, crop: bool | None = None) -> None:
        """Refuse a folder in another format, or (when building) made with another codec or crop rule."""
        info = self.info()
        if not info:
            return
        rebuild = f"delete {self.dir} and run `make cache CACHE_SIZE={self.size}` (python -m features cache --size {self.size})"
        if info.get("format") != FORMAT or info.get("size") != self.size:
            raise ValueError(f"{self.dir} holds an image cache in another format ({info.get('format')} at "
                             f"{info.get('size')} px, not {FORMAT}: before v2 slices were stretched, uncropped and "
                             f"uncompressed); {rebuild}")
        if codec is not None and info.get("codec") != codec:
            raise ValueError(f"{self.dir} was built with codec {info.get('codec')}, not {codec}; "
                             f"pass --codec {info.get('codec')} to extend it, or {rebuild}")
        if crop is not None and (info.get("crop") is not None) != crop:
            raise ValueError(f"{self.dir} was built {'with' if info.get('crop') else 'without'} the head crop; "
                             f"build it the same way to extend it, or {rebuild}")


Task = list[tuple[list[tuple[int, str]], list[int] | None]]  # per series: its (row, path)s, and a box to reuse


def _read_series(root: Path, rows: list[tuple[int, str]]) -> tuple[dict[int, np.ndarray], list[tuple[int, str]]]:
    """HU of each readable row; (row, reason) for the others."""
    from competition.dicom import read_hu  # imported here so spawn-started workers import it too

    hus, bad = {}, []
    for row, rel in rows:
        try:
            hus[row] = read_hu(root / rel)
        except Exception as exc:  # one broken file must not stop the pass; it is listed instead
            bad.append((row, getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"))
    return hus, bad


def series_boxes(hus: Iterable[np.ndarray], crop: bool) -> dict[tuple[int, int], np.ndarray]:
    """One square box per slice shape of a series: around the union of its head extents (``crop``),
    else the whole slice padded to a square."""
    by_shape: dict[tuple[int, int], list] = {}
    for hu in hus:
        by_shape.setdefault(hu.shape, []).append(crop_rule.head_extent(hu) if crop else None)
    return {shape: crop_rule.square_box(crop_rule.union(extents), shape) for shape, extents in by_shape.items()}


def _cache_chunk(root: str, store_dir: str, size: int, codec: str, crop: bool, task: Task) -> list[tuple[int, str]]:
    """Worker: read each series of ``task``, cut its box, resize, encode and write each row in
    place; returns (row, reason) for the bad ones."""
    store = _Store(Path(store_dir), size)
    # pwrite, not stores through a memory map: on a full disk a write into the sparse files fails
    # with ENOSPC (one line, the rows stay to do) where a mapped store kills the process (SIGBUS).
    fds = [os.open(p, os.O_WRONLY) for p in (store.data_path, store.lengths_path, store.boxes_path)]
    brain_fd = os.open(store.brain_path, os.O_WRONLY) if store.brain_path.is_file() else None
    bad = []
    try:
        for rows, reuse in task:
            hus, series_bad = _read_series(Path(root), rows)
            bad += series_bad
            shape_box = series_boxes(hus.values(), crop)
            for row, hu in hus.items():
                box = np.asarray(reuse, dtype=np.int32) if reuse is not None else shape_box[hu.shape]
                blob = encode(to_stored(hu, size, box), codec)
                os.pwrite(fds[0], blob, row * store.slot_bytes)
                os.pwrite(fds[1], np.uint32(len(blob)).tobytes(), row * 4)
                os.pwrite(fds[2], np.asarray(box, dtype=np.int32).tobytes(), row * 16)
                if brain_fd is not None:
                    os.pwrite(brain_fd, np.float32(brain_ratio(hu)).tobytes(), row * 4)
    finally:
        for fd in fds + ([brain_fd] if brain_fd is not None else []):
            os.close(fd)
    # No msync: the rows sit in the shared page cache, which outlives this process (as does the
    # parent's status write that follows); forcing them to disk here cost ~0.5 ms a slice.
    return bad


def _tasks(series: np.ndarray, todo_rows: np.ndarray, paths: list[str], reuse: dict[str, list[int]]) -> list[Task]:
    """Whole series per task, about CHUNK slices a task, in row order."""
    tasks: list[Task] = []
    current: Task = []
    n = 0
    frame = pd.DataFrame({"series": series, "row": todo_rows, "path": paths})
    for s, group in frame.groupby("series", sort=False):
        current.append((list(zip(group["row"].tolist(), group["path"].tolist())), reuse.get(s)))
        n += len(group)
        if n >= CHUNK:
            tasks.append(current)
            current, n = [], 0
    return tasks + ([current] if current else [])


def _boxes_to_reuse(store: _Store, series: np.ndarray, wanted: np.ndarray, status: np.ndarray) -> dict[str, list[int]]:
    """The box of each series that is partly cached and partly to do (new slices appended): its
    new slices get the same box, so that the series keeps one pixel grid."""
    cached = status[wanted] == CACHED
    todo = set(series[status[wanted] == TODO])
    first = pd.Series(wanted[cached], index=series[cached]).groupby(level=0).first()
    first = first[first.index.isin(todo)]
    boxes = store.open("boxes")
    return {s: boxes[r].tolist() for s, r in first.items()}


def build_cache(
    data_dir: Path | str,
    metadata: pd.DataFrame,
    cache_dir: Path | str,
    size: int = DEFAULT_SIZE,
    workers: int = 2,
    progress: bool = True,
    bad_files_csv: Path | str | None = None,
    codec: str = DEFAULT_CODEC,
    crop: bool = True,
) -> dict:
    """Cache every image of ``metadata`` (columns image_id, path, and series_id/slice_index when
    present) at ``size`` px; resumable. Returns what it did (counts, bytes, seconds, rate).

    ``codec`` is one of ``slice_codec.CODECS``; ``crop`` cuts each series to its head (else whole slices, padded
    to squares). ``bad_files_csv`` is the work folder's shared bad-files list; by default the
    ``bad_files.csv`` next to ``cache_dir`` (``WorkPaths.bad_files`` when ``cache_dir`` is
    ``WorkPaths.cache``). Before a build it prints the rows to write and their expected disk size
    (:func:`expected_cache_bytes`) when ``progress`` is on.
    """
    if size < 8:
        raise ValueError(f"cache size {size} px is too small; use e.g. 256 or 512")
    if codec not in CODECS:
        raise ValueError(f"unknown cache codec {codec!r}; one of {', '.join(CODECS)}")
    missing_cols = {"image_id", "path"} - set(metadata.columns)
    if missing_cols:
        raise ValueError(f"metadata lacks columns {sorted(missing_cols)}; build it with `python -m competition metadata`")
    t0 = time.perf_counter()
    store = _Store(size_dir(cache_dir, size), size)
    store.check_info(codec, crop)
    order = [c for c in ("split", "series_id", "slice_index", "image_id") if c in metadata.columns]
    table = metadata.sort_values(order, kind="mergesort")
    known = store.read_ids()
    known_set = set(known)
    new_ids = [i for i in table["image_id"] if i not in known_set]
    if new_ids or not known:
        store.extend(new_ids, codec, crop)
    ids = store.read_ids()
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    status = np.memmap(store.status_path, dtype=np.uint8, mode="r+", shape=(len(ids),))
    paths = dict(zip(table["image_id"], table["path"]))
    wanted = np.array([row_of[i] for i in table["image_id"]], dtype=np.int64)
    series = (table["series_id"] if "series_id" in table.columns else table["image_id"]).to_numpy(dtype=object)
    is_todo = status[wanted] == TODO
    todo_rows = wanted[is_todo]
    reuse = _boxes_to_reuse(store, series, wanted, status)
    tasks = _tasks(series[is_todo], todo_rows, [paths[ids[r]] for r in todo_rows], reuse)
    if progress and len(todo_rows):
        print(f"cache {size}px: {len(todo_rows):,} slices to write into {store.dir} ({codec}), expected "
              f"{expected_cache_bytes(len(todo_rows), size, codec) / 1e9:.2f} GB on disk "
              f"(at most {expected_cache_bytes(len(todo_rows), size, codec, worst_case=True) / 1e9:.2f} GB)",
              file=sys.stderr)
    check_free_space(store.dir, expected_cache_bytes(len(todo_rows), size, codec),
                     f"the {size} px cache ({len(todo_rows):,} slices)")
    bad_reasons = _read_bad(store.bad_path)
    new_bad = 0
    args = (str(Path(data_dir)), str(store.dir), size, codec, crop)
    try:
        with progress_bar(total=len(wanted), initial=len(wanted) - len(todo_rows), desc=f"cache {size}px", unit="slice",
                  disable=not progress, smoothing=0.05) as bar:
            for task, bad in _run_chunks(tasks, args, workers):
                bad_rows = {r for r, _ in bad}
                for r, reason in bad:
                    bad_reasons[ids[r]] = (paths[ids[r]], reason)
                task_rows = [r for rows, _ in task for r, _ in rows]
                for r in task_rows:
                    status[r] = BAD if r in bad_rows else CACHED
                new_bad += len(bad)
                bar.update(len(task_rows))
    finally:
        status.flush()
        if new_bad:
            _write_bad(store.bad_path, bad_reasons)
    bad_rows_all = [{"image_id": i, "path": p, "reason": reason} for i, (p, reason) in sorted(bad_reasons.items())]
    shared_csv = Path(bad_files_csv) if bad_files_csv is not None else Path(cache_dir).parent / "bad_files.csv"
    record_bad_files(shared_csv, bad_rows_all, stage=f"cache_{size}px")
    counts = np.bincount(np.asarray(status[wanted]), minlength=3)
    cached = wanted[status[wanted] == CACHED]
    lengths = np.fromfile(store.lengths_path, dtype=np.uint32, count=len(ids))
    seconds = time.perf_counter() - t0
    return {
        "cache_dir": str(store.dir),
        "size": size,
        "codec": codec,
        "images": int(len(wanted)),
        "cached": int(counts[CACHED]),
        "bad": int(counts[BAD]),
        "written_now": int(len(todo_rows) - new_bad),
        "bad_now": int(new_bad),
        "already_done": int(len(wanted) - len(todo_rows)),
        "bytes_per_slice": float(lengths[cached].mean()) if len(cached) else 0.0,
        "data_bytes": disk_bytes(store.dir),
        "bad_files_csv": str(store.bad_path),
        "seconds": round(seconds, 3),
        "slices_per_s": round(len(todo_rows) / seconds, 1) if len(todo_rows) else 0.0,
    }


def disk_bytes(directory: Path | str) -> int:
    """Bytes the files of a folder take on disk (sparse files count only their filled blocks)."""
    return sum(p.stat().st_blocks * 512 for p in Path(directory).iterdir() if p.is_file())


def _run_chunks(chunks: list[Task], args: tuple, workers: int) -> Iterable[tuple[Task, list]]:
    """Yield (task, bad rows) as tasks finish; in this process when ``workers`` <= 1."""
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield chunk, _cache_chunk(*args, chunk)
        return
    pool = worker_pool(min(workers, len(chunks)))  # its workers die with this process
    try:
        # A bounded window of tasks in flight keeps memory flat on 870k slices.
        pending = {}
        it = iter(chunks)
        for chunk in it:
            pending[pool.submit(_cache_chunk, *args, chunk)] = chunk
            if len(pending) >= 4 * workers:
                break
        while pending:
            future = next(iter(pending))  # in submission order: simple, and the pool stays busy
            chunk = pending.pop(future)
            yield chunk, future.result()
            nxt = next(it, None)
            if nxt is not None:
                pending[pool.submit(_cache_chunk, *args, nxt)] = nxt
    finally:
        # On Ctrl-C, drop the queued tasks instead of finishing them; their rows stay "to do".
        pool.shutdown(wait=True, cancel_futures=True)


def _read_bad(path: Path) -> dict[str, tuple[str, str]]:
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return {r.image_id: (r.path, r.reason) for r in table.itertuples()}


def _write_bad(path: Path, bad: dict[str, tuple[str, str]]) -> None:
    rows = [(i, p, reason) for i, (p, reason) in sorted(bad.items())]
    write_csv(path, pd.DataFrame(rows, columns=["image_id", "path", "reason"]))


def available_sizes(cache_dir: Path | str) -> list[int]:
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name[:-2]) for p in root.glob("*px") if p.name[:-2].isdigit() and (p / "info.json").is_file())


def cached_brain_ratios(cache_dir: Path | str, image_ids: Sequence[str] | np.ndarray) -> np.ndarray | None:
    """(N,) brain ratio of each image from every size that stores them (the value does not depend on
    the size), NaN where no size cached the image; None when no size stores brain ratios (a cache
    built before they were)."""
    caches = [c for c in (ImageCache(cache_dir, s) for s in available_sizes(cache_dir)) if c.has_brain_ratio]
    if not caches:
        return None
    return np.fmax.reduce([c.brain_ratios(image_ids) for c in caches]) if len(caches) > 1 else caches[0].brain_ratios(image_ids)


class ImageCache:
    """Read side of the cache. Cheap to pickle (DataLoader workers reopen the memory map)."""

    def __init__(self, cache_dir: Path | str, size: int | None = None):
        self.cache_dir = Path(cache_dir)
        sizes = available_sizes(self.cache_dir)
        if not sizes:
            raise FileNotFoundError(
                f"no image cache in {self.cache_dir}; build it with `python -m features cache --data DATA`"
            )
        if size is None:
            if len(sizes) > 1:
                raise ValueError(f"{self.cache_dir} holds caches of sizes {sizes} px; pass size=")
            size = sizes[0]
        if size not in sizes:
            raise FileNotFoundError(
                f"no {size} px cache in {self.cache_dir} (found {sizes} px); "
                f"build it with `python -m features cache --data DATA --size {size}`"
            )
        self.size = size
        self._store = _Store(size_dir(self.cache_dir, size), size)
        self._store.check_info()
        self.directory = self._store.dir
        self.ids = self._store.read_ids()
        self._row = {image_id: r for r, image_id in enumerate(self.ids)}
        self._status = np.fromfile(self._store.status_path, dtype=np.uint8, count=len(self.ids))
        self.codec = self._store.info().get("codec")
        self._data: np.ndarray | None = None
        self._lengths: np.ndarray | None = None
        self._index: pd.Index | None = None
        self.reads = 0  # slices read through this object (in this process)

    @classmethod
    def for_size(cls, cache_dir: Path | str, size: int) -> "ImageCache":
        """The cache to serve ``size`` px inputs from: that size if built, else the smallest larger
        one (shrunk on the fly by the dataset), else the largest."""
        sizes = available_sizes(cache_dir)
        larger = [s for s in sizes if s >= size]
        return cls(cache_dir, size=min(larger) if larger else (max(sizes) if sizes else size))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = state["_lengths"] = None  # memory maps would pickle as full copies
        return state

    @property
    def data(self) -> np.ndarray:
        """rows x slot bytes (uint8): a plain ndarray over the memory map, which skips np.memmap's
        per-index bookkeeping."""
        if self._data is None:
            self._data = np.asarray(self._store.open("data"))
            self._lengths = np.asarray(self._store.open("lengths"))
        return self._data

    @property
    def lengths(self) -> np.ndarray:
        self.data  # opens both
        assert self._lengths is not None
        return self._lengths

    def box(self, image_id: str) -> np.ndarray:
        """The square (y0, x0, y1, x1) cut from the image's slice, in its pixels (see features.crop)."""
        return np.array(self._store.open("boxes")[self.row(image_id)])

    def boxes_of(self, image_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """N x 4 boxes (see :meth:`box`); rows of images not cached are -1."""
        rows = self.rows_of(image_ids)
        out = np.array(self._store.open("boxes")[np.maximum(rows, 0)])
        out[rows < 0] = -1
        return out

    @property
    def has_brain_ratio(self) -> bool:
        return self._store.brain_path.is_file()

    def brain_ratios(self, image_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """(N,) float32 brain ratio of each image (:func:`brain_ratio`), NaN where it is not cached;
        a cache built before brain ratios were stored has none (``has_brain_ratio``): a KeyError."""
        if not self.has_brain_ratio:
            raise KeyError(f"{self._store.dir} holds no brain ratios (built before they were stored)")
        rows = self.rows_of(image_ids)
        out = np.array(self._store.open("brain")[np.maximum(rows, 0)], dtype=np.float32)
        out[rows < 0] = np.nan
        return out

    def __contains__(self, image_id: object) -> bool:
        r = self._row.get(image_id)  # type: ignore[arg-type]
        return r is not None and self._status[r] == CACHED

    def __len__(self) -> int:
        return int((self._status == CACHED).sum())

    @property
    def bad_ids(self) -> list[str]:
        return [self.ids[r] for r in np.flatnonzero(self._status == BAD)]

    def row(self, image_id: str) -> int:
        r = self._row.get(image_id)
        if r is None or self._status[r] != CACHED:
            why = "listed as bad (see bad_files.csv)" if r is not None and self._status[r] == BAD else "not cached"
            raise KeyError(f"image {image_id} is {why} in {self._store.dir}; "
                           f"(re)build with `python -m features cache --data DATA --size {self.size}`")
        return r

    def rows_of(self, image_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row of each id, -1 where it is not cached (unknown or bad)."""
        if self._index is None:
            self._index = pd.Index(self.ids)
        rows = self._index.get_indexer(pd.Index(np.asarray(image_ids, dtype=object))).astype(np.int64)
        known = rows >= 0
        rows[known & (self._status[np.where(known, rows, 0)] != CACHED)] = -1
        return rows

    def read_hu(self, image_id: str) -> np.ndarray:
        """size x size int16 HU of one image (a copy)."""
        return self.read_rows([self.row(image_id)])[0]

    def read_rows(self, rows: Sequence[int] | np.ndarray, dtype: np.dtype | type = DTYPE) -> np.ndarray:
        """K x size x size (int16, or ``dtype``) for already-resolved rows: the dataset's fast path.
        Raw rows are one copy out of the memory map, converted on the way; others are decoded."""
        rows = np.asarray(rows)
        self.reads += len(rows)
        data, lengths, size = self.data, self.lengths, self.size
        slot = data.shape[1]
        if (lengths[rows] == slot).all():
            raw = data[rows[0]][None] if len(rows) == 1 else data[rows]
            return raw.view(DTYPE).reshape(len(rows), size, size).astype(dtype)
        out = np.empty((len(rows), size, size), dtype=dtype)
        for k, r in enumerate(rows):
            decode(data[r, : lengths[r]], size, out[k])
        return out
