"""DICOM results of a prediction (prediction.dicom_outputs): the SR read back with highdicom gives the
decisions and probabilities of studies.csv / slices.csv; the secondary captures are in the source
study, reference their source slices, and say "research use only" in pixels and header."""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config
from pydicom.uid import generate_uid

from competition.constants import LABELS
from dicom_factory import random_stored, write_ct
from prediction import dicom_outputs
from prediction.outputs import study_table
from prediction.study import read_study


def read_sr(path: Path) -> dict[str, dict]:
    """tracking identifier -> {label: probability, "decision": Present/Absent/None, "sources": [...]},
    from the SR alone (highdicom's reader)."""
    sr = hd.sr.srread(path)
    out = {}
    for group in sr.content.get_image_measurement_groups():
        codes = {m.name.value: float(m.value) for m in group.get_measurements()}
        evaluations = [q.value.meaning for q in group.get_qualitative_evaluations()]
        out[group.tracking_identifier] = {
            **codes, "decision": evaluations[0] if evaluations else None,
            "sources": sorted(s.referenced_sop_instance_uid for s in group.source_images)}
    return out


def check_results(folder: Path, slices: pd.DataFrame, studies: pd.DataFrame, shown: list[str]) -> None:
    """The SR and SC images of the single study in ``studies`` against the tables."""
    row = studies.iloc[0]
    study_uid = str(row["study_id"])
    groups = read_sr(folder / study_uid / "sr.dcm")
    study = groups.pop(f"study {study_uid}")
    assert study["decision"] == {"bleed": "Present", "no bleed": "Absent"}.get(row["decision"])
    for label in LABELS:
        assert study[label] == pytest.approx(row[label], rel=1e-9, abs=1e-12)
    assert study["sources"] == sorted(slices["image_id"])
    assert sorted(groups) == sorted(f"slice {i}" for i in slices["image_id"])
    for _, s in slices.iterrows():
        group = groups[f"slice {s['image_id']}"]
        assert group["sources"] == [s["image_id"]] and group["decision"] is None
        for label in LABELS:
            assert group[label] == pytest.approx(s[label], rel=1e-9, abs=1e-12)
    sr = pydicom.dcmread(folder / study_uid / "sr.dcm")
    assert sr.StudyInstanceUID == study_uid and sr.SeriesInstanceUID not in set(slices["series_id"])
    assert sr.VerificationFlag == "UNVERIFIED" and "not a medical device" in sr.SeriesDescription
    text = str(sr)
    assert "research tool, not a medical device" in text.lower() and "Algorithm Version" in text
    scs = [pydicom.dcmread(folder / study_uid / f"sc_{n}.dcm") for n in range(1, len(shown) + 1)]
    assert not (folder / study_uid / f"sc_{len(shown) + 1}.dcm").exists()
    assert [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in scs] == shown
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1 and scs[0].SeriesInstanceUID != sr.SeriesInstanceUID
    for sc in scs:
        assert sc.StudyInstanceUID == study_uid and sc.BurnedInAnnotation == "YES"
        assert sc.PhotometricInterpretation == "RGB" and "RESEARCH USE ONLY" in sc.SeriesDescription
        pixels = sc.pixel_array
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        banner = pixels[: max(8, pixels.shape[1] // 30)]
        assert ((banner[..., 0] > 200) & (banner[..., 1] < 100)).any()  # the red burned-in words


def synthetic_series(root: Path, n: int = 5, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    for k in range(n):
        write_ct(root / f"{generate_uid()}.dcm", random_stored(rng, (size, size)), study=study, series=series,
                 z=2.5 * k, patient="P1")
    return root


def test_sr_and_sc_of_a_synthetic_series(tmp_path):
    """Plumbing without a model: random probabilities and Grad-CAM maps stand in for a prediction."""
    study = read_study(synthetic_series(tmp_path / "study"))
    meta = study.metadata.reset_index(drop=True)
    slices = meta[["image_id", "study_id", "series_id", "slice_index", "z"]].copy()
    rng = np.random.default_rng(1)
    slices[list(LABELS)] = rng.random((len(slices), len(LABELS)))
    studies = study_table(slices, {"threshold": 0.5})
    shown = slices.sort_values("any", ascending=False)["image_id"].head(2).tolist()
    overlays = {i: (study.hu[i], rng.random(study.hu[i].shape)) for i in reversed(shown)}
    algo = dicom_outputs.algorithm(["a", "b"], "level-1 mean", 0.5)
    written = dicom_outputs.write_dicom(tmp_path / "dicom", dicom_outputs.read_sources(study), slices, studies,
                                        algo, overlays)
    assert len(written) == 3
    with config.strict_reading():  # every value of the written objects is valid DICOM
        for path in written:
            pydicom.dcmread(path).walk(lambda ds, elem: elem.value)
    check_results(tmp_path / "dicom", slices, studies, shown)


def test_no_threshold_gives_no_decision(tmp_path):
    study = read_study(synthetic_series(tmp_path / "study", n=2))
    slices = study.metadata[["image_id", "study_id", "series_id", "slice_index", "z"]].copy()
    slices[list(LABELS)] = 0.25
    studies = study_table(slices, {})
    algo = dicom_outputs.algorithm(["a"], "level-1 mean", None)
    dicom_outputs.write_dicom(tmp_path / "dicom", dicom_outputs.read_sources(study), slices, studies, algo, {})
    groups = read_sr(tmp_path / "dicom" / str(studies["study_id"][0]) / "sr.dcm")
    assert [g["decision"] for g in groups.values()] == [None] * 3


@pytest.mark.slow
def test_make_predict_dicom_out_on_the_real_series(real_sample, tmp_path):
    """One tiny model trained on synthetic data predicts the real series with --dicom: the SR and the
    Grad-CAM images agree with the CSV files it wrote."""
    from conftest import prepare_tiny_competition
    from level1_models.train import run_model
    from prediction.run import predict_folder

    data, paths = prepare_tiny_competition(tmp_path / "c")
    run_model("tiny_resnet", data, paths.root, dict(epochs=1, img_size=32, batch_size=16, workers=0, device="cpu",
                                                      augment=False, pretrained=False))
    out = predict_folder(real_sample, paths, out=tmp_path / "out", device="cpu", top=2, report=False, dicom=True)
    slices = pd.read_csv(out / "slices.csv", dtype={"study_id": str})
    studies = pd.read_csv(out / "studies.csv", dtype={"study_id": str})
    shown = slices.sort_values("any", ascending=False, kind="mergesort")["image_id"].head(2).tolist()
    check_results(out / "dicom", slices, studies, shown)
