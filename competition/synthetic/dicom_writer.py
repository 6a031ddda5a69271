"""Writing a slice as a DICOM file with the same header fields, in the same order, as the
competition's files (see ../shared/rsna_sample): ids that are not valid UIDs, 12-bit unsigned
pixels with intercept -1024, zero-padded multi-valued windows, Explicit VR Little Endian.

Two of the real data's faults can be written on purpose:
- the 12-bit intercept quirk: stored values are the HU as 12-bit two's complement and the
  intercept is 0, so a reader must add 1000, wrap values >= 4096 by subtracting 4096 and use an
  intercept of -1000 to get the HU back (densities are clipped to [-1000, 3095] for that);
- truncated pixel data: a readable header whose PixelData holds half the bytes it should.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

IMPLEMENTATION_VERSION = "rsna-synthetic"
QUIRK_INTERCEPT = "0"


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters, as scanners write them."""
    text = f"{value:.10g}"
    return "0" if text == "-0" else text


def stored_pixels(hu: np.ndarray, intercept_quirk: bool) -> np.ndarray:
    """The uint16 values to store for HU, normally (HU + 1024) or with the intercept quirk."""
    if intercept_quirk:
        return np.mod(np.clip(np.rint(hu), -1000, 3095), 4096).astype(np.uint16)
    return (np.clip(np.rint(hu), -1024, 3071) + 1024).astype(np.uint16)


def write_slice(
    path: Path,
    hu: np.ndarray,
    *,
    sop_id: str,
    patient_id: str,
    study_id: str,
    series_id: str,
    ipp: tuple[float, float, float],
    iop: tuple[float, ...],
    pixel_spacing: float,
    window: tuple[list[str], list[str]],
    intercept_quirk: bool = False,
    truncate: bool = False,
) -> None:
    with warnings.catch_warnings():
        # The competition's ids ("ID_<hex>") are not valid UIDs; pydicom warns on each one.
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = _dataset(hu, sop_id, patient_id, study_id, series_id, ipp, iop, pixel_spacing, window, intercept_quirk,
                      truncate)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _dataset(hu, sop_id, patient_id, study_id, series_id, ipp, iop, pixel_spacing, window, intercept_quirk,
             truncate) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_id
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_id
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_id
    ds.SeriesInstanceUID = series_id
    ds.StudyID = ""
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.PixelSpacing = [_ds(pixel_spacing), _ds(pixel_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    centre, width = window
    ds.WindowCenter = centre if len(centre) > 1 else centre[0]
    ds.WindowWidth = width if len(width) > 1 else width[0]
    ds.RescaleIntercept = QUIRK_INTERCEPT if intercept_quirk else "-1024"
    ds.RescaleSlope = "1"
    data = stored_pixels(hu, intercept_quirk).tobytes()
    if truncate:
        data = data[: len(data) // 4 * 2]  # half the bytes, an even count as OW requires
    ds.PixelData = data
    ds["PixelData"].VR = "OW"
    return ds
