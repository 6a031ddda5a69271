"""DICOM results of a prediction, in the study they describe (``make predict DICOM_OUT=1``).

Per study, two new series beside the CT (same StudyInstanceUID, patient and study attributes copied
from the source slices, which are referenced):

- ``sr.dcm``: a Comprehensive 3D SR holding a TID 1500 measurement report. One measurement group for
  the study (the six probabilities, max over the slices as in studies.csv, and the bleed decision
  at the OOF threshold as a qualitative evaluation), then one group per slice with its six
  probabilities and that slice as source image. Every group names the algorithm: its name says
  "research tool, not a medical device", its version the package version, its parameters the
  models and how their probabilities were combined. The report is left not final, not verified.
- ``sc_<n>.dcm``: the top slices of each series (highest ``any``) as RGB secondary capture images:
  brain window, Grad-CAM overlay, and the burned-in words "RESEARCH USE ONLY" (BurnedInAnnotation
  YES), each referencing its source slice.

Codes: the finding is SNOMED CT 1386000 "Intracranial hemorrhage" and Present/Absent are SNOMED CT
52101004/272519000 (all three as pydicom's code dictionary has them). The six probabilities and the
procedure carry codes of a private scheme (``CODING``): no checked standard code exists here for each
competition label's probability.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, generate_uid

from competition.constants import LABELS
from features.windows import PRESETS, window_linear

RESEARCH = "Research tool, not a medical device"
BURNED_IN = "RESEARCH USE ONLY - not a medical device"
CODING = "99RSNAICH"  # private coding scheme: the competition's labels
MANUFACTURER = "rsna-ensemble (research)"
# Type-2 attributes (present, may be empty) that highdicom copies from the source into the results.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "AccessionNumber", "StudyID")
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902  # high: clear of the scanner's own series numbers


def label_code(label: str):
    import highdicom as hd

    return hd.sr.CodedConcept(label, CODING, f"Probability of {label} intracranial hemorrhage")


def package_version() -> str:
    try:
        return version("rsna-ensemble")
    except PackageNotFoundError:
        return "unknown"


def algorithm(models: Sequence[str], level: str, threshold: float | None):
    """The AlgorithmIdentification every measurement group carries."""
    import highdicom as hd

    parameters = [f"models: {', '.join(models)}", f"slice probabilities: {level}",
                  f"study probability: max over slices; bleed decision threshold on any: {threshold}"]
    return hd.sr.AlgorithmIdentification(name=f"RSNA ICH ensemble ({RESEARCH})", version=package_version(),
                                         parameters=parameters)


def read_source(path: Path) -> Dataset:
    """A slice's header without pixels; the SOP class from the file meta where the dataset lacks it
    and the patient and study attributes the results copy left empty where absent (the
    competition's anonymised files have neither)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = ds.file_meta.get("MediaStorageSOPClassUID", CTImageStorage)
    return ds


def read_sources(study) -> dict[str, Dataset]:
    """Header of each predicted slice (image_id -> dataset), read again from its file."""
    meta = study.metadata[study.metadata["readable"]]
    root = study.root if study.root.is_dir() else study.root.parent
    return {row.image_id: read_source(root / row.path) for row in meta.itertuples()}


def measurements(row: pd.Series) -> list:
    """The six probabilities (the algorithm is named once per group, not per measurement: half the tree)."""
    import highdicom as hd

    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    return [hd.sr.Measurement(name=label_code(label), value=float(row[label]), unit=unit) for label in LABELS]


def study_group(row: pd.Series, sources: list[Dataset], algo):
    """The study-level group: max probabilities and, where a threshold exists, the decision."""
    import highdicom as hd

    evaluations = []
    if row["decision"] in ("bleed", "no bleed"):
        value = codes.SCT.Present if row["decision"] == "bleed" else codes.SCT.Absent
        evaluations.append(hd.sr.QualitativeEvaluation(codes.SCT.IntracranialHemorrhage, value))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"study {row['study_id']}"),
        finding_type=codes.SCT.IntracranialHemorrhage, algorithm_id=algo, measurements=measurements(row),
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources])


def slice_group(row: pd.Series, source: Dataset, algo):
    import highdicom as hd

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"slice {row['image_id']}"),
        finding_type=codes.SCT.IntracranialHemorrhage, algorithm_id=algo, measurements=measurements(row),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])


def build_sr(study_row: pd.Series, slices: pd.DataFrame, sources: Mapping[str, Dataset], algo) -> Dataset:
    """The measurement report of one study (``slices``: that study's rows of slices.csv)."""
    import highdicom as hd

    evidence = [sources[i] for i in slices["image_id"]]
    groups = [study_group(study_row, evidence, algo)]
    groups += [slice_group(row, sources[row["image_id"]], algo) for _, row in slices.iterrows()]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="RSNA ICH ensemble", model_name=package_version()))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("CT-HEAD", CODING, "CT of head"), imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = f"ICH probabilities: {RESEARCH}"[:64]
    return sr


def overlay_rgb(hu: np.ndarray, cam: np.ndarray, caption: str) -> np.ndarray:
    """8-bit RGB: the slice in the brain window, Grad-CAM over it (opacity following the heat, as in
    report.html) and the research-use banner and ``caption`` burned in."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    brain = window_linear(hu, PRESETS["brain"].center, PRESETS["brain"].width)
    rgb = np.repeat(np.clip(brain, 0, 1)[..., None], 3, axis=2)
    top = float(cam.max()) or 1.0
    level = np.clip(cam / top, 0, 1)
    heat = matplotlib.colormaps["jet"](level)[..., :3]
    alpha = (0.75 * np.sqrt(level))[..., None]
    image = Image.fromarray(np.rint(255 * ((1 - alpha) * rgb + alpha * heat)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    size = max(8, image.width // 30)
    font = ImageFont.load_default(size=size)
    draw.rectangle([0, 0, image.width, size + 6], fill=(0, 0, 0))
    draw.text((4, 2), BURNED_IN, fill=(255, 60, 60), font=font)
    draw.rectangle([0, image.height - size - 6, image.width, image.height], fill=(0, 0, 0))
    draw.text((4, image.height - size - 4), caption, fill=(255, 255, 0), font=font)
    return np.asarray(image)


def build_sc(source: Dataset, rgb: np.ndarray, series_uid: str, number: int, comment: str) -> Dataset:
    """One secondary capture image of ``rgb``, in the source slice's study, referencing that slice."""
    import highdicom as hd

    spacing = tuple(float(v) for v in source.PixelSpacing) if "PixelSpacing" in source else None
    sc = hd.sc.SCImage.from_ref_dataset(
        source, rgb, "RGB", 8, "PATIENT", series_uid, SC_SERIES_NUMBER, generate_uid(), number,
        manufacturer=MANUFACTURER, pixel_spacing=spacing, patient_orientation=("L", "P"))
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "Grad-CAM top slices: RESEARCH USE ONLY"
    sc.ImageComments = f"{comment}. {RESEARCH}."
    sc.DerivationDescription = "Brain window of the source slice with the Grad-CAM map of label any overlaid"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def write_dicom(out: Path, sources: Mapping[str, Dataset], slices: pd.DataFrame, studies: pd.DataFrame, algo,
                overlays: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[Path]:
    """``out/<study_id>/sr.dcm`` and ``sc_<n>.dcm`` per study; ``overlays``: image_id -> (hu, cam) of
    the slices to show, in the order to show them."""
    written = []
    for _, row in studies.iterrows():
        folder = out / str(row["study_id"])
        folder.mkdir(parents=True, exist_ok=True)
        mine = slices[slices["study_id"].astype(str) == str(row["study_id"])]
        objects = [("sr.dcm", build_sr(row, mine, sources, algo))]
        series_uid = generate_uid()
        p_any = mine.set_index("image_id")["any"]
        shown = sorted((i for i in overlays if i in p_any.index), key=lambda i: -p_any[i])
        for n, image_id in enumerate(shown, 1):
            caption = f"any = {p_any[image_id]:.3f} (top {n} of study)"
            rgb = overlay_rgb(*overlays[image_id], caption)
            objects.append((f"sc_{n}.dcm", build_sc(sources[image_id], rgb, series_uid, n, caption)))
        for name, ds in objects:
            tmp = folder / f".{name}.tmp"
            ds.save_as(tmp, enforce_file_format=True)
            tmp.replace(folder / name)
            written.append(folder / name)
    return written


def write_dicom_results(out: Path, result, studies: pd.DataFrame, predictor, top: int = 3) -> list[Path]:
    """The DICOM results of ``predictor``'s ``result`` (prediction.run's StudyPrediction) under ``out``."""
    from prediction.report import explanations, top_slices

    ensemble = predictor.ensemble
    algo = algorithm([m.name for m in ensemble.members], result.level, ensemble.threshold.get("threshold"))
    ids = [i for _, series in result.slices.groupby("series_id", sort=False) for i in top_slices(series, top)]
    overlays = {image_id: (hu, cam) for image_id, hu, cam, _, _ in explanations(result, predictor, ids)}
    return write_dicom(out, read_sources(result.study), result.slices, studies, algo, overlays)
