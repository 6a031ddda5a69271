"""DICOM -> Hounsfield units, with the RSNA data's known quirks fixed.

One function, :func:`read_hu`, is the only way pixels enter the pipeline. It handles:
- slope/intercept (and window fields) that arrive as numbers, strings or multi-valued strings
  such as ``[00040, 00040]``;
- the 12-bit quirk: some files have BitsStored 12, PixelRepresentation 0 and an intercept above
  -100, with stored values shifted by -1000 modulo 4096; they are corrected by adding 1000,
  wrapping values >= 4096 and using intercept -1000;
- any image size (not every file is 512x512);
- compressed transfer syntaxes (JPEG baseline, extended and lossless, JPEG-LS, JPEG 2000, RLE),
  decoded by pydicom with the codec packages in the project's dependencies (pylibjpeg and its
  plugins, gdcm);
- pixel padding (becomes air) and missing rescale tags (a stated convention or a refusal): see
  ``competition.hu_rules``; each case gives a note that the callers print and list;
- files that cannot be used: a :class:`DicomReadError` naming the file and why (a dangling link, no
  permission, a header cut short, a multi-frame object, pixels that do not decode), never a
  crash deep inside numpy.
"""
from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.errors import InvalidDicomError

from competition import hu_rules

# The competition's UIDs are "ID_<hex>" strings, not valid DICOM UIDs: validating them on every
# access only floods the log with warnings (and costs time in the header pass).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Fields read in the header-only pass (see competition.metadata).
HEADER_TAGS = (
    "SOPInstanceUID",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ImagePositionPatient",
    "InstanceNumber",
    "SliceLocation",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "WindowCenter",
    "WindowWidth",
    "RescaleSlope",
    "RescaleIntercept",
    "BitsStored",
    "PixelRepresentation",
)


HEADER_PREFIX = 8192  # bytes read for a header-only pass; the competition's headers are ~1 KB
PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as little-endian group, element


class DicomReadError(ValueError):
    """A file that is not a readable CT slice. ``path`` names it."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def first_number(value: Any, default: float = float("nan")) -> float:
    """A header value as one float: numbers, numeric strings, and multi-valued fields.

    Multi-valued fields (``[00040, 00040]``) give their first value, as the competition's
    windows do; ``None`` or an empty value gives ``default``.
    """
    if value is None:
        return default
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        parts = [p for p in text.replace("\\", " ").replace("[", " ").replace("]", " ").replace(",", " ").split()]
        return float(parts[0]) if parts else default
    if isinstance(value, Sequence) or hasattr(value, "__iter__"):
        items = list(value)
        return first_number(items[0], default) if items else default
    return float(value)


def has_12bit_quirk(ds: Dataset) -> bool:
    """True for the files whose stored values are shifted (see the module docstring)."""
    return (
        int(ds.get("BitsStored", 16)) == 12
        and int(ds.get("PixelRepresentation", 0)) == 0
        and "RescaleIntercept" in ds  # without one, hu_rules.rescale decides
        and first_number(ds.get("RescaleIntercept"), 0.0) > -100
    )


_NATIVE_LE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def _native_pixels(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored values of an uncompressed little-endian 16-bit single-frame slice and the 16-bit
    words as written (which padding is compared with), or None.

    The competition's files are all of this kind, and decoding them straight from the bytes is
    about 20x faster than ``ds.pixel_array``. It does what pydicom does to them: bits above
    BitsStored are masked off (unsigned) or sign-extended (signed). Anything else, and any
    pixel data of the wrong length, returns None so that pydicom decodes it (or says why not).
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in _NATIVE_LE or int(ds.get("BitsAllocated", 0)) != 16 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    rows, cols, data = int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), ds.PixelData
    if rows * cols == 0 or len(data) != rows * cols * 2:
        return None
    bits = int(ds.get("BitsStored", 16))
    if not 1 <= bits <= 16:
        return None
    if int(ds.get("PixelRepresentation", 0)) == 1:
        shift = 16 - bits  # sign-extend from BitsStored
        words = np.frombuffer(data, "<i2").reshape(rows, cols)
        return (words << shift) >> shift, words
    words = np.frombuffer(data, "<u2").reshape(rows, cols)
    return (words & np.uint16((1 << bits) - 1) if bits < 16 else words), words


CODEC_PACKAGES = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle python-gdcm"


def _decode_failure(ds: Dataset, exc: Exception) -> str:
    """Why pixel data failed to decode, with the fix when a codec package is missing."""
    reason = f"pixel data cannot be decoded ({type(exc).__name__}: {' '.join(str(exc).split())})"
    if "missing dependencies" in str(exc):  # pydicom's words when no plugin for the syntax is installed
        meta = getattr(ds, "file_meta", None)
        name = getattr(meta.get("TransferSyntaxUID"), "name", "this transfer syntax") if meta is not None else "this transfer syntax"
        reason += f"; no codec for {name} is installed: run `make setup` (or pip install {CODEC_PACKAGES})"
    return reason


def frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent or unreadable)."""
    try:
        return int(first_number(ds.get("NumberOfFrames"), 1.0))
    except (TypeError, ValueError):
        return 1


MULTI_FRAME = "multi-frame object ({n} frames in one file): multi-frame objects are not supported; export the series as single-frame slices"


def _stored(ds: Dataset, path: Path | str) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored values (masked to BitsStored) and, for native files, the words as written."""
    if "PixelData" not in ds:
        raise DicomReadError(path, no_pixels_reason(ds, path))
    if frames(ds) > 1:
        raise DicomReadError(path, MULTI_FRAME.format(n=frames(ds)))
    native = _native_pixels(ds)
    if native is not None:
        return native
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises ValueError/AttributeError/... for broken pixel data
        raise DicomReadError(path, _decode_failure(ds, exc)) from exc
    if pixels.ndim != 2:
        raise DicomReadError(path, f"expected one 2-D slice, got pixel array of shape {pixels.shape}")
    return pixels, None


def _tag_number(ds: Dataset, keyword: str) -> float | None:
    value = first_number(ds.get(keyword)) if keyword in ds else float("nan")
    return None if np.isnan(value) else value


def hu_from_dataset(ds: Dataset, path: Path | str = "<dataset>", notes: list[str] | None = None) -> np.ndarray:
    """The HU image (float32, rows x columns) of an already-read dataset. Pixel padding becomes air
    and missing rescale tags follow ``hu_rules``; each such case appends one line to ``notes``."""
    pixels, words = _stored(ds, path)
    padded, what = hu_rules.padding_mask(ds, pixels, words)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    try:
        slope, intercept, note = hu_rules.rescale(_tag_number(ds, "RescaleSlope"), _tag_number(ds, "RescaleIntercept"),
                                                  signed, pixels if padded is None else pixels[~padded],
                                                  ct=str(ds.get("Modality", "CT") or "CT").upper() == "CT")
    except ValueError as exc:
        raise DicomReadError(path, str(exc)) from None
    image = pixels.astype(np.float32)
    if has_12bit_quirk(ds):
        image += 1000.0
        image[image >= 4096.0] -= 4096.0
        intercept = -1000.0
    image *= np.float32(slope)
    image += np.float32(intercept)
    if padded is not None and padded.any():
        image[padded] = hu_rules.AIR_HU
        note = "; ".join(filter(None, [hu_rules.padding_note(what), note]))
    if note and notes is not None:
        notes.append(note)
    return image


def read_dataset(path: Path | str, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file, turning every way it can fail into a DicomReadError naming it."""
    path = Path(path)
    try:
        if stop_before_pixels:
            with open(path, "rb") as fh:
                head = fh.read(HEADER_PREFIX)
            # Parsing an in-memory prefix is ~30% faster than pydicom's buffered file reads, but only
            # a prefix that holds the PixelData tag is known to hold the whole header.
            if PIXEL_DATA_TAG_LE in head:
                return pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True)
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError as exc:
        raise DicomReadError(path, _not_found(path)) from exc
    except PermissionError as exc:
        raise DicomReadError(path, "permission denied: the file cannot be read by this user (check its mode/owner)") from exc
    except InvalidDicomError as exc:
        raise DicomReadError(path, f"not a DICOM file ({exc})") from exc
    except OSError as exc:
        if exc.errno is None:  # pydicom's own OSErrors: a header it could not parse
            raise DicomReadError(path, f"unreadable DICOM header, probably truncated ({_size(path)}; {exc})") from exc
        raise DicomReadError(path, f"cannot be read: {exc.strerror} (errno {exc.errno})") from exc
    except Exception as exc:  # truncated headers raise EOFError, struct.error, OSError...
        raise DicomReadError(path, f"unreadable DICOM header, probably truncated ({_size(path)}; {type(exc).__name__}: {exc})") from exc


def _not_found(path: Path) -> str:
    if path.is_symlink():
        return f"dangling symbolic link (its target {os.readlink(path)} does not exist)"
    return "file not found (moved or deleted?); for the competition's files, check DATA points at the Kaggle layout"


def _size(path: Path | str) -> str:
    try:
        return f"{Path(path).stat().st_size} bytes"
    except OSError:
        return "size unknown"


def no_pixels_reason(ds: Dataset, path: Path | str) -> str:
    """Why a dataset read without error has no PixelData: cut short (an image's header, or nothing
    after the file meta) or an object that is not an image at all."""
    sop = str(ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    image_class = "Image Storage" in getattr(pydicom.uid.UID(sop), "name", "") if sop else False
    if len(ds) == 0 or "Rows" in ds or image_class:
        return f"truncated file ({_size(path)}): no pixel data, the file ends inside its header; copy it again"
    return "no pixel data (not an image)"


def read_hu(path: Path | str) -> np.ndarray:
    """Hounsfield units of one CT slice as a float32 (rows x columns) array."""
    return hu_from_dataset(read_dataset(path), path)


def _raw_values(ds: Dataset, keyword: str) -> list | None:
    """A header field's values without pydicom's value conversion (the header pass's hot path).

    Reads the raw bytes of an element still in its file form: strings split on backslash, US as
    unsigned shorts. Elements pydicom has already converted are returned as they are.
    """
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    if not isinstance(elem, RawDataElement):
        value = elem.value
        return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    raw = elem.value
    if raw is None or len(raw) == 0:
        return []
    vr = elem.VR or dictionary_VR(elem.tag)
    if vr == "US":
        fmt = "<" if ds.is_little_endian in (True, None) else ">"
        return list(struct.unpack(f"{fmt}{len(raw) // 2}H", raw))
    return [v.strip() for v in raw.decode("latin-1").strip("\x00 ").split("\\")]


def _float(values: list | None, i: int = 0, default: float = float("nan")) -> float:
    if not values or len(values) <= i or values[i] in ("", None):
        return default
    return first_number(values[i], default)


def header_fields(ds: Dataset) -> dict[str, Any]:
    """The header fields the metadata table keeps, as plain Python values."""
    text = {k: _raw_values(ds, k) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")}
    position = _raw_values(ds, "ImagePositionPatient")
    spacing = _raw_values(ds, "PixelSpacing")
    return {
        "patient_id": str(text["PatientID"][0]) if text["PatientID"] else "",
        "study_id": str(text["StudyInstanceUID"][0]) if text["StudyInstanceUID"] else "",
        "series_id": str(text["SeriesInstanceUID"][0]) if text["SeriesInstanceUID"] else "",
        "z": _float(position, 2),
        "instance_number": _float(_raw_values(ds, "InstanceNumber")),
        "slice_location": _float(_raw_values(ds, "SliceLocation")),
        "rows": int(_float(_raw_values(ds, "Rows"), default=0)),
        "columns": int(_float(_raw_values(ds, "Columns"), default=0)),
        "pixel_spacing_row": _float(spacing, 0),
        "pixel_spacing_col": _float(spacing, 1),
        "slice_thickness": _float(_raw_values(ds, "SliceThickness")),
        "window_center": _float(_raw_values(ds, "WindowCenter")),
        "window_width": _float(_raw_values(ds, "WindowWidth")),
        "slope": _float(_raw_values(ds, "RescaleSlope"), default=1.0),
        "intercept": _float(_raw_values(ds, "RescaleIntercept"), default=0.0),
        "bits_stored": int(_float(_raw_values(ds, "BitsStored"), default=16)),
        "pixel_representation": int(_float(_raw_values(ds, "PixelRepresentation"), default=0)),
    }
