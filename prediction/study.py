"""A folder of DICOM files as it comes off a scanner: the axial CT slices to predict, grouped and
ordered like the competition's metadata pass, and every other file listed with why it was skipped.

Files are found recursively, whatever their names; links to folders are followed, a folder
reached again (a loop) and a folder this user may not list are listed as skipped with the reason.
One slice per position of a series is kept (``competition.slice_order.duplicate_positions``);
slices no header places are placed by their pixels (``prediction.placement``). Files used with a
caveat (padding, a missing rescale tag, a placed slice) are listed in ``Study.warnings``. A slice is kept when its header reads, it is CT
(or says no modality), it is not a scout (ImageType LOCALIZER, or a plane more than
``MAX_TILT_DEGREES`` from axial) and its pixels decode to one 2-D image. The table has the columns
of ``competition.metadata.COLUMNS`` with ``image_id`` = SOPInstanceUID (the competition's file
stem), so the level-1 datasets read it as they read the competition's.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from competition.dicom import (MULTI_FRAME, DicomReadError, frames, header_fields, hu_from_dataset,
                               no_pixels_reason, read_dataset)
from competition.metadata import COLUMNS
from competition.slice_order import add_slice_order, duplicate_positions
from prediction.placement import place_unplaced

MAX_TILT_DEGREES = 45.0  # gantry tilt of head CT stays well below; scouts and reformats are ~90
GAP_FACTOR = 1.5  # a step in z this many times its series' median step: slices are missing there
SKIPPED_COLUMNS = ["path", "reason"]
WARNING_COLUMNS = ["path", "warning"]


class NothingToPredict(ValueError):
    """No usable axial CT slice in the study folder (or no such folder)."""


@dataclass
class Study:
    """The slices to predict (``metadata``, one row per slice, ordered), their HU and the skipped files.

    ``metadata`` also holds slices whose pixels do not decode (``readable`` False): they keep their
    place in the z order, as in the competition's metadata, but get no prediction."""

    root: Path
    metadata: pd.DataFrame
    hu: dict[str, np.ndarray] = field(repr=False)
    skipped: pd.DataFrame  # SKIPPED_COLUMNS: files and folders not predicted, and why
    warnings: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=WARNING_COLUMNS))  # used, with a caveat

    @property
    def readable_ids(self) -> list[str]:
        return self.metadata.loc[self.metadata["readable"], "image_id"].tolist()


def list_files(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file under ``root`` (sorted; hidden files and folders skipped), following links to
    folders, and (folder, reason) for each folder not scanned: one it may not list, and one a link
    leads to again (a loop, or a second path to a folder already scanned)."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    scanned: dict[tuple[int, int], str] = {}

    def visit(folder: Path, rel: str) -> None:
        info = folder.stat()
        key = (info.st_dev, info.st_ino)
        if key in scanned:
            skipped.append((f"{rel}/", f"symbolic link to {os.readlink(folder) if folder.is_symlink() else folder}, a "
                                       f"folder already scanned as {scanned[key]}: not scanned twice (a loop or a second path)"))
            return
        scanned[key] = f"{rel}/" if rel else "the STUDY folder"
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: (e.is_symlink(), e.name))
        except PermissionError:
            skipped.append((f"{rel}/", "permission denied: this folder cannot be listed by this user, so its files are "
                                       "not read (chmod a+rx it, or run as its owner)"))
            return
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                visit(Path(entry.path), sub)
            else:  # files, links to files and dangling links: read_dataset names what is wrong
                files.append(Path(entry.path))

    visit(root, "")
    files.sort(key=lambda p: str(p.relative_to(root)))
    return files, skipped


def plane_tilt_degrees(orientation: object) -> float | None:
    """Angle between the slice normal (row x column cosines) and the patient's z axis; None if unknown."""
    try:
        values = [float(v) for v in orientation]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(values) != 6:
        return None
    normal = np.cross(values[:3], values[3:])
    norm = float(np.linalg.norm(normal))
    if not norm:
        return None
    return math.degrees(math.acos(min(1.0, abs(normal[2]) / norm)))


def not_a_slice(ds, path: Path | str) -> str | None:
    """Why a read dataset is not an axial CT slice to predict, or None."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality and modality != "CT":
        return f"modality {modality}, not CT"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "scout (ImageType LOCALIZER)"
    tilt = plane_tilt_degrees(ds.get("ImageOrientationPatient"))
    if tilt is not None and tilt > MAX_TILT_DEGREES:
        return f"not axial (plane {tilt:.0f} degrees from axial): a scout or a reformat"
    if frames(ds) > 1:
        return MULTI_FRAME.format(n=frames(ds))
    if "PixelData" not in ds:
        return no_pixels_reason(ds, path)
    return None


def compact(hu: np.ndarray) -> np.ndarray:
    """The HU image as int16 where that is exact (integer slope and intercept: nearly every CT),
    else float32: half the memory for a folder of thousands of slices, the same values."""
    as_int = np.rint(hu)
    if np.array_equal(as_int, hu) and as_int.min(initial=0) >= -32768 and as_int.max(initial=0) <= 32767:
        return as_int.astype(np.int16)
    return hu


def read_without_preamble(path: Path, error: DicomReadError):
    """A dataset written without the 128-byte preamble and file meta (some PACS exports), read with
    ``force`` and given the transfer syntax its encoding implies; else the original error."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not error.reason.startswith("not a DICOM file"):
        raise error
    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds or "Rows" not in ds:
            raise error
        implicit, little = ds.original_encoding
    except DicomReadError:
        raise
    except Exception:  # garbage read with force: it stays "not a DICOM file"
        raise error from None
    if not little:
        raise error
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _read_file(path: Path) -> tuple[object | None, str | None]:
    """(dataset, None) for an axial CT slice, else (None, why it is skipped)."""
    try:
        try:
            ds = read_dataset(path)
        except DicomReadError as exc:
            ds = read_without_preamble(path, exc)
        reason = not_a_slice(ds, path)
    except DicomReadError as exc:
        return None, exc.reason
    return (None, reason) if reason else (ds, None)


def _drop_repeats(table: pd.DataFrame, hus: dict[str, np.ndarray], skipped: list) -> pd.DataFrame:
    """Keep one slice per position of a series (the readable one, then the lowest InstanceNumber,
    then SOPInstanceUID); the others are skipped, saying whether their pixels differ."""
    repeats = duplicate_positions(table)
    for r in repeats.itertuples():
        same = r.image_id in hus and r.kept_id in hus and np.array_equal(hus[r.image_id], hus[r.kept_id])
        skipped.append((r.path, f"same position as {r.kept_path} (z = {r.z:g} mm in series {r.series_id}; "
                                f"{'identical' if same else 'different'} pixels): one slice per position is predicted, "
                                f"{r.kept_path} is kept"))
        hus.pop(r.image_id, None)
    return table[~table["image_id"].isin(repeats["image_id"])]


def read_study(root: Path | str) -> Study:
    """Scan ``root`` (a folder, searched recursively, or one file); raise NothingToPredict when no
    slice is left (also for a missing or empty folder)."""
    root = Path(root)
    if not root.exists():
        what = f"a dangling symbolic link to {os.readlink(root)}" if root.is_symlink() else "does not exist"
        raise NothingToPredict(f"STUDY {root} {what}; point STUDY= at a folder of DICOM files")
    files, skipped = ([root], []) if root.is_file() else list_files(root)
    rows, hus, warnings, seen = [], {}, [], {}
    for path in files:
        rel = path.name if path == root else str(path.relative_to(root))
        ds, reason = _read_file(path)
        if reason:
            skipped.append((rel, reason))
            continue
        fields = header_fields(ds)
        image_id = str(ds.get("SOPInstanceUID") or "").strip() or path.stem
        if image_id in seen:
            skipped.append((rel, f"duplicate of {seen[image_id]} (same SOPInstanceUID {image_id})"))
            continue
        seen[image_id] = rel
        fields["series_id"] = fields["series_id"] or "unknown-series"
        fields["study_id"] = fields["study_id"] or fields["series_id"]
        readable, notes = True, []
        try:
            hus[image_id] = compact(hu_from_dataset(ds, path, notes))
        except DicomReadError as exc:
            skipped.append((rel, exc.reason))
            readable = False
        warnings += [(rel, note) for note in notes]
        rows.append({"image_id": image_id, "split": "predict", "path": rel, **fields, "readable": readable})
    if not hus:
        listed = "; ".join(f"{p}: {r}" for p, r in skipped[:3]) or "the folder is empty"
        raise NothingToPredict(f"no axial CT slice to predict in {root} ({len(files)} files; {listed})")
    table = _drop_repeats(pd.DataFrame(rows), hus, skipped)
    order: list[tuple[str, str]] = []
    table = add_slice_order(table.drop(columns=["slice_index", "n_slices"], errors="ignore"), order)
    table = place_unplaced(table, hus, order)  # slices no header places, by their pixels
    table = table[[*COLUMNS, "readable"]].sort_values(["study_id", "series_id", "slice_index"], ignore_index=True)
    return Study(root=root, metadata=table, hu=hus, skipped=pd.DataFrame(skipped, columns=SKIPPED_COLUMNS),
                 warnings=pd.DataFrame(warnings + order + z_gaps(table), columns=WARNING_COLUMNS))


def z_gaps(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(path of the slice after the gap, warning) where a series' step in z exceeds GAP_FACTOR times
    its median step: part of the series was not given. The models read neighbouring slices (2.5D
    inputs, level 2's neighbour features and sequence model), so rows near a gap differ from those
    of the whole series; a series cut short at either end cannot be told from a short one."""
    found = []
    for series, rows in table.groupby("series_id", sort=False):  # rows in slice order
        z, paths = rows["z"].to_numpy(np.float64), rows["path"].to_numpy()
        steps = np.abs(np.diff(z))  # NaN beside a slice placed without a z: no gap is claimed there
        if np.isfinite(steps).sum() < 2 or (spacing := float(np.nanmedian(steps))) <= 0:
            continue
        for i in np.flatnonzero(steps > GAP_FACTOR * spacing):
            found.append((str(paths[i + 1]), f"series {series}: no slice between z = {z[i]:.1f} and {z[i + 1]:.1f} mm "
                          f"(about {round(steps[i] / spacing) - 1} missing at its {spacing:.2f} mm spacing); the "
                          f"slices near the gap are predicted without their neighbours: give the whole series"))
    return found
