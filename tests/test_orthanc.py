"""A real Orthanc on 127.0.0.1 (temporary configuration) routes a study to `make listen`'s node, which
predicts it with a tiny trained model and stores the SR and the Grad-CAM series back into Orthanc, in
the same study (by C-STORE, or by STOW-RS through Orthanc's DICOMweb plugin); the SR read back from
Orthanc gives studies.csv's decision and probabilities. With the plugin, `make predict` also reads the
study straight from Orthanc by WADO-RS and gives what it gives on the original files.

Skips where Orthanc is not installed (Debian packages ``orthanc``, ``orthanc-dicomweb``: .ci/run would
install them)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import REAL_SAMPLE
from test_listener import ROOT, echo, free_port, series, stop

ORTHANC = shutil.which("Orthanc") or (Path("/usr/sbin/Orthanc") if Path("/usr/sbin/Orthanc").exists() else None)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)")]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}


class Orthanc:
    def __init__(self, root: Path, listener_port: int, dicomweb: bool = False):
        self.http, self.dicom = free_port(), free_port()
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {"Name": "test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
                  "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
                  "DicomCheckCalledAet": False, "Plugins": [], "DicomScuTimeout": 300,  # a loaded machine answers late
                  "DicomModalities": {"rsna": ["RSNA_ICH", "127.0.0.1", listener_port]}}
        if dicomweb:
            config.update(Plugins=[str(DICOMWEB_PLUGIN)], DicomWeb={"Enable": True, "Root": "/dicom-web/"})
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen([str(ORTHANC), str(root / "orthanc.json")], stdout=subprocess.DEVNULL,
                                     stderr=open(root / "orthanc.log", "w"))
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/system")
                break
            except OSError:
                assert self.proc.poll() is None, (root / "orthanc.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "Orthanc did not answer on HTTP within 60 s"
                time.sleep(0.5)

    def request(self, path: str, data: bytes | None = None) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", data=data, timeout=120) as r:
            return r.read()

    def get(self, path: str):
        return json.loads(self.request(path))

    def post(self, path: str, data: bytes):
        return json.loads(self.request(path, data))

    def url(self, path: str = "") -> str:
        return f"dicomweb://127.0.0.1:{self.http}/dicom-web{path}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def as_a_scanner_sends(path: Path) -> bytes:
    """The file's bytes with SOPClassUID in the dataset: Kaggle's de-identification stripped it from the
    competition files (it survives only in the file meta), and Orthanc cannot C-STORE an instance
    without it ("Unable to determine the SOP class/instance"); a scanner's or PACS's files carry it."""
    import io

    import pydicom

    ds = pydicom.dcmread(path)
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on the tiny synthetic competition: (DATA, WorkPaths)."""
    from conftest import prepare_tiny_competition
    from level1_models.train import run_model

    data, paths = prepare_tiny_competition(tmp_path_factory.mktemp("c"))
    run_model("tiny_resnet", data, paths.root, dict(epochs=1, img_size=32, batch_size=16, workers=0, device="cpu",
                                                      augment=False, pretrained=False))
    return data, paths


def study_files(tmp_path: Path) -> list[Path]:
    real = REAL_SAMPLE / "stage_2_test"
    return sorted(real.glob("*.dcm")) if real.is_dir() else series(tmp_path, 6)  # a clean clone: synthetic


def upload(orthanc: Orthanc, files: list[Path]) -> str:
    """The files into Orthanc; returns Orthanc's id of their (one) study."""
    for f in files:
        orthanc.post("/instances", as_a_scanner_sends(f))
    (study,) = orthanc.get("/studies")
    return study


def route_to_listener(orthanc: Orthanc, study: str, trained, dest: str, queue: Path, port: int) -> tuple[list, bytes]:
    """Start the listener, have Orthanc C-STORE the study to it, wait for the SR and the Grad-CAM series
    to appear in Orthanc; returns the study's series and the SR's bytes as Orthanc has them."""
    data, paths = trained
    log = queue.with_name("listener.log")
    listener = subprocess.Popen(
        [sys.executable, "-m", "prediction.listener", "--data", str(data), "--work", str(paths.root),
         "--device", "cpu", "--top", "2", "--host", "127.0.0.1", "--port", str(port), "--allow", "ORTHANC",
         "--settle", "3", "--dest", dest, "--queue", str(queue)], cwd=ROOT, env=ENV, stderr=open(log, "w"))
    try:  # generous deadlines: a loaded CI machine takes minutes to import torch and load the models
        deadline = time.monotonic() + 900
        while not echo(port, "ORTHANC"):  # the listener loads its models before it listens
            assert listener.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(1)
        orthanc.post("/modalities/rsna/store", study.encode())
        deadline = time.monotonic() + 600
        while len(orthanc.get(f"/studies/{study}/series")) < 3 and time.monotonic() < deadline:
            assert listener.poll() is None, log.read_text()[-2000:]
            time.sleep(2)
    finally:
        stop(listener)
    results = orthanc.get(f"/studies/{study}/series")
    srs = [s for s in results if s["MainDicomTags"].get("Modality") == "SR"]
    return results, orthanc.request(f"/instances/{srs[0]['Instances'][0]}/file") if srs else b""


def check_sr(sr_bytes: bytes, studies_csv: Path, tmp_path: Path) -> None:
    """The SR as Orthanc returns it, read with highdicom, against studies.csv."""
    from test_dicom_outputs import read_sr

    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    studies = pd.read_csv(studies_csv, dtype={"study_id": str})
    group = read_sr(tmp_path / "sr.dcm")[f"study {studies['study_id'][0]}"]
    assert group["decision"] == {"bleed": "Present", "no bleed": "Absent"}.get(studies["decision"][0])
    assert group["any"] == pytest.approx(studies["any"][0], rel=1e-9)


def test_orthanc_routes_a_study_to_the_listener_and_gets_the_results(tmp_path, trained):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", port)
    try:
        study = upload(orthanc, study_files(tmp_path))
        results, sr_bytes = route_to_listener(orthanc, study, trained, f"127.0.0.1:{orthanc.dicom}:ORTHANC",
                                              tmp_path / "queue", port)
    finally:
        orthanc.stop()
    modalities = sorted(s["MainDicomTags"].get("Modality") for s in results)
    assert modalities == ["CT", "OT", "SR"], modalities  # the CT, the Grad-CAM series, the SR: one study
    (done,) = (tmp_path / "queue" / "done").iterdir()
    check_sr(sr_bytes, done / "output" / "studies.csv", tmp_path)


@pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="Orthanc's DICOMweb plugin is not installed "
                                                         "(apt-get install orthanc-dicomweb)")
def test_dicomweb_predict_and_a_stow_rs_destination(tmp_path, trained):
    """make predict STUDY=dicomweb://... reads the study from Orthanc by WADO-RS and predicts what the
    original files give; the listener with DEST=dicomweb://... stores its results by STOW-RS."""
    import pydicom

    from prediction.run import predict_folder

    data, paths = trained
    files = study_files(tmp_path)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", port, dicomweb=True)
    try:
        study = upload(orthanc, files)
        out = tmp_path / "web"
        subprocess.run([sys.executable, "-m", "prediction", "predict", "--study", orthanc.url(f"/studies/{uid}"),
                        "--data", str(data), "--work", str(paths.root), "--device", "cpu", "--out", str(out),
                        "--no-report"], cwd=ROOT, env=ENV, check=True)
        results, sr_bytes = route_to_listener(orthanc, study, trained, orthanc.url(), tmp_path / "queue", port)
    finally:
        orthanc.stop()
    assert sorted(p.name for p in (out / "source").iterdir()) == sorted(
        f"{pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm" for f in files)
    local = predict_folder(files[0].parent, paths, out=tmp_path / "local", device="cpu", report=False)
    web, original = (pd.read_csv(o / "slices.csv").sort_values("image_id").reset_index(drop=True)
                     for o in (out, local))
    pd.testing.assert_frame_equal(web, original)
    assert sorted(s["MainDicomTags"].get("Modality") for s in results) == ["CT", "OT", "SR"]
    (done,) = (tmp_path / "queue" / "done").iterdir()
    check_sr(sr_bytes, done / "output" / "studies.csv", tmp_path)
