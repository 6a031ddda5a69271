"""Build small CT DICOM files for tests, with the fields and quirks of the real competition files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian


def write_ct(
    path: Path,
    stored: np.ndarray,
    *,
    patient: str = "ID_0000aaaa",
    study: str = "ID_00000000aa",
    series: str = "ID_00000000bb",
    z: float | None = 0.0,
    instance_number: int | None = None,
    intercept: float | str = -1024,
    slope: float | str = 1,
    window_center: object = "40\\40",
    window_width: object = "80\\80",
    bits_stored: int = 12,
    pixel_representation: int = 0,
    with_pixels: bool = True,
) -> Path:
    """Write ``stored`` (uint16 raw values) as an uncompressed little-endian CT slice named by ``path``'s stem."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPInstanceUID = path.stem
    ds.Modality = "CT"
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    if z is not None:  # None: a file without ImagePositionPatient
        ds.ImagePositionPatient = [-125.0, -120.0, z]
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [0.48828125, 0.48828125]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.WindowCenter = window_center
    ds.WindowWidth = window_width
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    if with_pixels:
        dtype = np.int16 if pixel_representation else np.uint16
        ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def random_stored(rng: np.random.Generator, shape=(32, 32)) -> np.ndarray:
    """12-bit unsigned raw values (HU -1024..3071 with intercept -1024)."""
    return rng.integers(0, 4096, size=shape, dtype=np.uint16)


def write_mini_competition(data: Path, patients: int = 6, slices: int = 3, broken: bool = False) -> Path:
    """A small competition in the Kaggle layout: ``patients`` x ``slices`` labelled train slices
    (even patients positive on their middle slice), one test slice, and with ``broken`` one train
    file that is not DICOM at all (for the bad-files list)."""
    import pandas as pd

    from competition.constants import LABELS

    rows = []
    for p in range(patients):
        for s in range(slices):
            image_id = f"ID_{p:04x}{s:05x}"
            write_ct(data / "stage_2_train" / f"{image_id}.dcm", np.zeros((4, 4), np.uint16),
                     patient=f"ID_{p:08x}", series=f"ID_{p:010x}", z=float(s))
            rows += [(f"{image_id}_{label}", int(p % 2 == 0 and s == 1)) for label in LABELS]
    write_ct(data / "stage_2_test" / "ID_fffffffff.dcm", np.zeros((4, 4), np.uint16))
    if broken:
        (data / "stage_2_train" / "ID_eeeeeeeee.dcm").write_bytes(b"not a DICOM file")
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(data / "stage_2_train.csv", index=False)
    return data
