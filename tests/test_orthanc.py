"""A real Orthanc on 127.0.0.1 (temporary configuration) routes a study to `make listen`'s node, which
predicts it with a tiny trained model and stores the SR and the Grad-CAM series back into Orthanc, in
the same study; the SR read back from Orthanc gives studies.csv's decision and probabilities.

Skips where Orthanc is not installed (Debian package ``orthanc``: .ci/run would install it)."""
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
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)")]


class Orthanc:
    def __init__(self, root: Path, listener_port: int):
        self.http, self.dicom = free_port(), free_port()
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {"Name": "test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
                  "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
                  "DicomCheckCalledAet": False, "Plugins": [],
                  "DicomModalities": {"rsna": ["RSNA_ICH", "127.0.0.1", listener_port]}}
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


def test_orthanc_routes_a_study_to_the_listener_and_gets_the_results(tmp_path):
    from conftest import prepare_tiny_competition
    from level1_models.train import run_model
    from test_dicom_outputs import read_sr

    data, paths = prepare_tiny_competition(tmp_path / "c")
    run_model("tiny_resnet", data, paths.root, dict(epochs=1, img_size=32, batch_size=16, workers=0, device="cpu",
                                                      augment=False, pretrained=False))
    real = REAL_SAMPLE / "stage_2_test"
    files = sorted(real.glob("*.dcm")) if real.is_dir() else series(tmp_path, 6)  # a clean clone: synthetic
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", port)
    listener = subprocess.Popen(
        [sys.executable, "-m", "prediction.listener", "--data", str(data), "--work", str(paths.root),
         "--device", "cpu", "--top", "2", "--host", "127.0.0.1", "--port", str(port), "--allow", "ORTHANC",
         "--settle", "3", "--dest", f"127.0.0.1:{orthanc.dicom}:ORTHANC", "--queue", str(tmp_path / "queue")],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    try:
        for f in files:
            orthanc.post("/instances", as_a_scanner_sends(f))
        (study,) = orthanc.get("/studies")
        deadline = time.monotonic() + 300
        while not echo(port, "ORTHANC"):  # the listener loads its models before it listens
            assert listener.poll() is None and time.monotonic() < deadline, "the listener did not start"
            time.sleep(1)
        orthanc.post("/modalities/rsna/store", study.encode())
        while len(orthanc.get(f"/studies/{study}/series")) < 3 and time.monotonic() < deadline:
            assert listener.poll() is None, "the listener exited"
            time.sleep(2)
    finally:
        stop(listener)
        results = orthanc.get(f"/studies/{study}/series") if orthanc.proc.poll() is None else []
        srs = [s for s in results if s["MainDicomTags"].get("Modality") == "SR"]
        sr_bytes = orthanc.request(f"/instances/{srs[0]['Instances'][0]}/file") if srs else b""
        orthanc.proc.terminate()
        orthanc.proc.wait(30)
    modalities = sorted(s["MainDicomTags"].get("Modality") for s in results)
    assert modalities == ["CT", "OT", "SR"], modalities  # the CT, the Grad-CAM series, the SR: one study
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    (done,) = (tmp_path / "queue" / "done").iterdir()
    studies = pd.read_csv(done / "output" / "studies.csv", dtype={"study_id": str})
    group = read_sr(tmp_path / "sr.dcm")[f"study {studies['study_id'][0]}"]
    assert group["decision"] == {"bleed": "Present", "no bleed": "Absent"}.get(studies["decision"][0])
    assert group["any"] == pytest.approx(studies["any"][0], rel=1e-9)
