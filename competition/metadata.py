"""The metadata table: one row per image from a parallel, header-only pass over every DICOM.

Resumable: finished chunks are kept in ``<out>.parts/`` until the table is written, and a run on a
dataset whose table already covers every file reads nothing. A table written by an older version
(lacking a column) is read again from the files.

Slice order within a series (``slice_index``): ``competition.slice_order``. Every image keeps its
row, also one at the same position as another of its series (the submission needs every id); such
repeats, slices placed without their own position, pixel padding and missing rescale tags are
printed (one line per reason) and listed in ``reader_notes.csv`` beside ``bad_files.csv``.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset

from competition import hu_rules
from competition.atomic import write_parquet
from competition.badfiles import NOTES_NAME, record_bad_files, record_notes, summary_lines
from competition.dicom import DicomReadError, header_fields, hu_from_dataset, read_dataset
from competition.layout import Layout
from competition.progress import progress_bar
from competition.locks import stage_lock
from competition.pools import worker_pool
from competition.slice_order import add_slice_order, duplicate_positions

EXTRA = ["slice_location", "reader_note"]  # read and used here, not kept in the table
CHUNK = 2000  # files per resumable part; also the unit of work handed to a process

COLUMNS = [
    "image_id", "split", "path", "patient_id", "study_id", "series_id", "z", "instance_number", "slice_index", "n_slices",
    "rows", "columns", "pixel_spacing_row", "pixel_spacing_col", "slice_thickness",
    "window_center", "window_width", "slope", "intercept", "bits_stored", "pixel_representation",
]


def list_images(layout: Layout) -> pd.DataFrame:
    """Every ``*.dcm`` of the dataset: image_id (file stem), split, path relative to DATA."""
    rows = []
    for split, folder in layout.image_dirs().items():
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.endswith(".dcm") and (e.is_file() or e.is_symlink()):  # a dangling link is listed as bad
                    rows.append((e.name[:-4], split, f"{folder.name}/{e.name}"))
    table = pd.DataFrame(rows, columns=["image_id", "split", "path"]).sort_values("image_id", ignore_index=True)
    dup = table["image_id"][table["image_id"].duplicated()]
    if len(dup):
        raise ValueError(f"image ids found in both train and test: {', '.join(dup[:5])}")
    return table


def reader_note(ds: Dataset, path: Path) -> str:
    """What ``hu_from_dataset`` will note for this file when the cache reads it ("" for nearly all):
    its pixel padding, or a missing rescale tag, for which the file is read whole now so that the
    note (or the refusal, raised) is the one predict gives."""
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        what = hu_rules.padding_what(ds)
        return hu_rules.padding_note(what) if what else ""
    notes: list[str] = []
    hu_from_dataset(read_dataset(path), path, notes)
    return "; ".join(notes)


def read_headers(root: str, rel_paths: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Header fields of each file (with its ``reader_note``); unreadable ones go to the second list
    with the reason."""
    good, bad = [], []
    for rel in rel_paths:
        try:
            ds = read_dataset(Path(root) / rel, stop_before_pixels=True)
            good.append({"path": rel, **header_fields(ds), "reader_note": reader_note(ds, Path(root) / rel)})
        except DicomReadError as exc:
            bad.append({"image_id": Path(rel).stem, "path": rel, "reason": exc.reason})
    return good, bad


def report_notes(table: pd.DataFrame, order_notes: list[tuple[str, str]], reread: set[str],
                 bad_files_csv: Path | str | None) -> None:
    """Print the reader's notes, one line per reason, and list them in reader_notes.csv."""
    read = table.loc[table["path"].isin(reread) & table["reader_note"].fillna("").ne(""), ["path", "reader_note"]]
    file_notes = list(read.itertuples(index=False, name=None))
    repeats = duplicate_positions(table)
    order_notes = order_notes + [
        (r.path, f"same position as {r.kept_path} (z = {r.z:g} mm in series {r.series_id}): both kept, every image needs its row")
        for r in repeats.itertuples()]
    for line in summary_lines(file_notes + order_notes):
        print(f"note: {line}", file=sys.stderr)
    if bad_files_csv is not None:
        notes_csv = Path(bad_files_csv).with_name(NOTES_NAME)
        record_notes(notes_csv, file_notes, stage="metadata", reread=reread)
        record_notes(notes_csv, order_notes, stage="slice_order")


def build_metadata(
    data_dir: Path | str,
    out_path: Path | str,
    workers: int | None = None,
    progress: bool = True,
    bad_files_csv: Path | str | None = None,
) -> pd.DataFrame:
    """Read every header of the dataset into ``out_path`` (parquet); returns the table.

    Holds the ``metadata`` lock of ``out_path``'s folder: a second run on the same folder is told
    who holds it instead of sharing (and deleting) the parts folder.
    """
    layout = Layout.find(data_dir)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with stage_lock(out_path.parent, "metadata"):
        return _build_metadata(layout, out_path, workers, progress, bad_files_csv)


def _build_metadata(layout: Layout, out_path: Path, workers: int | None, progress: bool,
                    bad_files_csv: Path | str | None) -> pd.DataFrame:
    files = list_images(layout)
    if files.empty:
        raise FileNotFoundError(f"no .dcm files under {layout.train_dir} or {layout.test_dir}")
    kept: list[pd.DataFrame] = []
    done = pd.read_parquet(out_path) if out_path.is_file() else None
    if done is not None and not set(COLUMNS) <= set(done.columns):
        print(f"{out_path} lacks {sorted(set(COLUMNS) - set(done.columns))} (an older version wrote it); reading every header again")
        done = None
    if done is not None:
        if set(done["image_id"]) == set(files["image_id"]):
            return done
        # New files were added (or some were unreadable last time): read only those.
        kept.append(done.drop(columns=["image_id", "split", "slice_index", "n_slices"]))

    parts_dir = out_path.with_name(out_path.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    n_parts = len(list(parts_dir.glob("part-*.parquet")))
    parts = [pd.read_parquet(p) for p in sorted(parts_dir.glob("part-*.parquet"))]
    kept += [p for p in parts if "instance_number" in p.columns]  # an older version's parts are read again
    seen = set().union(*(set(p["path"]) for p in kept)) if kept else set()
    todo = files.loc[~files["path"].isin(seen), "path"].tolist()
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks) or 1))
    bad_rows: list[dict] = []
    # A previous run's bad files are read again: they are few, and may have been replaced since.
    root = str(layout.root)
    with progress_bar(total=len(files), initial=len(files) - len(todo), desc="headers", unit="file", disable=not progress) as bar, ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(worker_pool(workers))
            futures = [pool.submit(read_headers, root, chunk) for chunk in chunks]
            results = (future.result() for future in futures)
        else:  # in-process: no pool start-up for small datasets, and easy to debug
            results = (read_headers(root, chunk) for chunk in chunks)
        for n, (good, bad) in enumerate(results):
            part = pd.DataFrame(good, columns=["path", *COLUMNS[3:], *EXTRA]).drop(columns=["slice_index", "n_slices"])
            write_parquet(parts_dir / f"part-{n_parts + n:06d}.parquet", part)  # whole or absent
            kept.append(part)
            bad_rows += bad
            bar.update(len(good) + len(bad))

    headers = pd.concat(kept, ignore_index=True).drop_duplicates("path")
    table = files.merge(headers, on="path", how="inner", validate="one_to_one")
    order_notes: list[tuple[str, str]] = []
    table = add_slice_order(table.assign(**{c: table[c] if c in table else np.nan for c in EXTRA}), order_notes)
    report_notes(table, order_notes, set(todo), bad_files_csv)
    table = table[COLUMNS]
    if bad_files_csv is not None:
        record_bad_files(bad_files_csv, bad_rows, stage="metadata")
    write_parquet(out_path, table)
    shutil.rmtree(parts_dir)  # also any temporary file a killed run left there
    return table
