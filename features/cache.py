"""The image cache: every slice's Hounsfield units, resized once, served without reading a DICOM.

Format (chosen by measurement, see ``python -m features.bench``): one memory-mapped file of int16
HU per size, ``<cache_dir>/<size>px/hu.int16``, rows of size x size pixels. Compared with 16-bit
PNG it is about twice the bytes (2 bytes per pixel: 128 KiB per 256 px slice) but a read is a
memcpy (tens of microseconds against about a millisecond to decode a PNG), and writing costs
nothing next to reading the DICOM. HU are rounded to integers and clipped below at -1024 (air):
values below air are padding outside the scanner's field of view; no window looks below it.

Rows follow the series and z order of the metadata, so the slices a 2.5D input reads together lie
next to each other on disk. A one-byte status per row (0 to do, 1 cached, 2 bad) makes the pass
resumable: a rerun does only the rows still to do, and new images in the metadata are appended.
Bad files are listed with their reason in ``<size>px/bad_files.csv`` and in the work folder's
shared bad-files list (stage ``cache_<size>px``).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from competition.atomic import write_csv
from competition.badfiles import record_bad_files
from competition.diskspace import check_free_space
from competition.pools import worker_pool

FORMAT = "int16-hu-memmap-v1"
DTYPE = np.dtype(np.int16)
HU_MIN = -1024  # air; lower values (padding outside the field of view) are stored as air
HU_MAX = int(np.iinfo(np.int16).max)
DEFAULT_SIZE = 256
CHUNK = 64  # slices per task handed to a worker process

TODO, CACHED, BAD = 0, 1, 2


def size_dir(cache_dir: Path | str, size: int) -> Path:
    return Path(cache_dir) / f"{size}px"


def resize_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """HU image -> size x size float32 (area averaging when shrinking, bilinear when growing)."""
    if hu.shape == (size, size):
        return hu.astype(np.float32, copy=False)
    shrink = hu.shape[0] >= size and hu.shape[1] >= size
    return cv2.resize(
        hu.astype(np.float32, copy=False), (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


def to_stored(hu: np.ndarray, size: int) -> np.ndarray:
    """What the cache stores for one HU image: clipped, resized, rounded to int16."""
    hu = np.clip(hu, HU_MIN, HU_MAX, dtype=np.float32)
    return np.rint(resize_hu(hu, size)).astype(DTYPE)


class _Store:
    """The files of one size: ids.txt (row order), status.uint8, hu.int16, info.json."""

    def __init__(self, directory: Path, size: int):
        self.dir, self.size = directory, size
        self.ids_path = directory / "ids.txt"
        self.status_path = directory / "status.uint8"
        self.data_path = directory / "hu.int16"
        self.info_path = directory / "info.json"
        self.bad_path = directory / "bad_files.csv"

    @property
    def slice_bytes(self) -> int:
        return self.size * self.size * DTYPE.itemsize

    def read_ids(self) -> list[str]:
        return self.ids_path.read_text().split() if self.ids_path.is_file() else []

    def extend(self, new_ids: Sequence[str]) -> None:
        """Append rows for ``new_ids``: ids, to-do statuses, and room in the data file."""
        self.dir.mkdir(parents=True, exist_ok=True)
        n_old = len(self.read_ids())
        with self.ids_path.open("a") as f:
            f.writelines(f"{i}\n" for i in new_ids)
        n = n_old + len(new_ids)
        for path, row_bytes in ((self.status_path, 1), (self.data_path, self.slice_bytes)):
            with path.open("ab") as f:
                f.truncate(n * row_bytes)  # sparse: no bytes written until a row is filled
        self.info_path.write_text(json.dumps({"format": FORMAT, "size": self.size, "dtype": DTYPE.name,
                                              "hu_min": HU_MIN, "rows": n}, indent=1))

    def check_info(self) -> None:
        if not self.info_path.is_file():
            return
        info = json.loads(self.info_path.read_text())
        if info.get("format") != FORMAT or info.get("size") != self.size:
            raise ValueError(f"{self.dir} holds a cache in another format ({info}); delete that folder to rebuild it")


def _cache_chunk(root: str, data_path: str, size: int, n_rows: int, tasks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Worker: read, resize and write each (row, path); returns (row, reason) for the bad ones."""
    from competition.dicom import read_hu  # imported here so spawn-started workers import it too

    data = np.memmap(data_path, dtype=DTYPE, mode="r+", shape=(n_rows, size, size))
    bad = []
    for row, rel in tasks:
        try:
            data[row] = to_stored(read_hu(Path(root) / rel), size)
        except Exception as exc:  # one broken file must not stop the pass; it is listed instead
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            bad.append((row, reason))
    data.flush()
    del data
    return bad


def build_cache(
    data_dir: Path | str,
    metadata: pd.DataFrame,
    cache_dir: Path | str,
    size: int = DEFAULT_SIZE,
    workers: int = 2,
    progress: bool = True,
    bad_files_csv: Path | str | None = None,
) -> dict:
    """Cache every image of ``metadata`` (columns image_id, path, and series_id/slice_index when
    present) at ``size`` px; resumable. Returns what it did (counts, bytes, seconds, rate).

    ``bad_files_csv`` is the work folder's shared bad-files list; by default the ``bad_files.csv``
    next to ``cache_dir`` (that is ``WorkPaths.bad_files`` when ``cache_dir`` is ``WorkPaths.cache``).
    """
    if size < 8:
        raise ValueError(f"cache size {size} px is too small; use e.g. 256 or 512")
    missing_cols = {"image_id", "path"} - set(metadata.columns)
    if missing_cols:
        raise ValueError(f"metadata lacks columns {sorted(missing_cols)}; build it with `python -m competition metadata`")
    t0 = time.perf_counter()
    store = _Store(size_dir(cache_dir, size), size)
    store.check_info()
    order = [c for c in ("split", "series_id", "slice_index", "image_id") if c in metadata.columns]
    table = metadata.sort_values(order, kind="mergesort")
    known = store.read_ids()
    known_set = set(known)
    new_ids = [i for i in table["image_id"] if i not in known_set]
    if new_ids or not known:
        store.extend(new_ids)
    ids = store.read_ids()
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    status = np.memmap(store.status_path, dtype=np.uint8, mode="r+", shape=(len(ids),))
    paths = dict(zip(table["image_id"], table["path"]))
    wanted = np.array([row_of[i] for i in table["image_id"]], dtype=np.int64)
    todo_rows = wanted[status[wanted] == TODO]
    todo = [(int(r), paths[ids[r]]) for r in todo_rows]
    check_free_space(store.dir, len(todo) * store.slice_bytes, f"the {size} px cache ({len(todo):,} slices)")
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    bad_reasons = _read_bad(store.bad_path)
    new_bad = 0
    args = (str(Path(data_dir)), str(store.data_path), size, len(ids))
    try:
        with tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc=f"cache {size}px", unit="slice",
                  disable=not progress, smoothing=0.05) as bar:
            for chunk, bad in _run_chunks(chunks, args, workers):
                bad_rows = {r for r, _ in bad}
                for r, reason in bad:
                    bad_reasons[ids[r]] = (paths[ids[r]], reason)
                for r, _ in chunk:
                    status[r] = BAD if r in bad_rows else CACHED
                new_bad += len(bad)
                bar.update(len(chunk))
    finally:
        status.flush()
        if new_bad:
            _write_bad(store.bad_path, bad_reasons)
    bad_rows_all = [{"image_id": i, "path": p, "reason": reason} for i, (p, reason) in sorted(bad_reasons.items())]
    shared_csv = Path(bad_files_csv) if bad_files_csv is not None else Path(cache_dir).parent / "bad_files.csv"
    record_bad_files(shared_csv, bad_rows_all, stage=f"cache_{size}px")
    counts = np.bincount(np.asarray(status[wanted]), minlength=3)
    seconds = time.perf_counter() - t0
    return {
        "cache_dir": str(store.dir),
        "size": size,
        "images": int(len(wanted)),
        "cached": int(counts[CACHED]),
        "bad": int(counts[BAD]),
        "written_now": int(len(todo) - new_bad),
        "bad_now": int(new_bad),
        "already_done": int(len(wanted) - len(todo)),
        "bytes_per_slice": store.slice_bytes,
        "data_bytes": int(len(ids) * store.slice_bytes),
        "bad_files_csv": str(store.bad_path),
        "seconds": round(seconds, 3),
        "slices_per_s": round(len(todo) / seconds, 1) if todo else 0.0,
    }


def _run_chunks(chunks: list[list[tuple[int, str]]], args: tuple, workers: int) -> Iterable[tuple[list, list]]:
    """Yield (chunk, bad rows) as chunks finish; in this process when ``workers`` <= 1."""
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
        self.ids = self._store.read_ids()
        self._row = {image_id: r for r, image_id in enumerate(self.ids)}
        self._status = np.fromfile(self._store.status_path, dtype=np.uint8, count=len(self.ids))
        self._data: np.memmap | None = None
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
        state["_data"] = None  # a memmap would pickle as a full copy of the array
        return state

    @property
    def data(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self._store.data_path, dtype=DTYPE, mode="r",
                                   shape=(len(self.ids), self.size, self.size))
        return self._data

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
        self.reads += 1
        return np.array(self.data[self.row(image_id)])

    def read_rows(self, rows: Sequence[int] | np.ndarray, dtype: np.dtype | type = DTYPE) -> np.ndarray:
        """K x size x size (int16, or ``dtype``) for already-resolved rows: the dataset's fast path,
        one copy out of the memory map, converted on the way."""
        rows = np.asarray(rows)
        self.reads += len(rows)
        data = np.asarray(self.data)  # a plain ndarray view: skips np.memmap's per-index bookkeeping
        if len(rows) == 1:
            return data[rows[0]].astype(dtype)[None]
        return data[rows].astype(dtype, copy=False)
