"""make listen (prediction.listener) as a DICOM node, driven by pynetdicom's own SCU and received by a
tiny pynetdicom SCP in the test: a study sent is predicted once and its results come back in the same
study; a calling AE off the allow list is refused; a listener killed (SIGKILL) mid-study and restarted
finishes that study exactly once.

The listener runs in a subprocess with a stand-in predictor (``fake_predict``: fixed probabilities
per slice, the real DICOM writer): these tests are about the plumbing, not the models
(tests/test_dicom_outputs.py runs a trained model through the same writer)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refused connections while the listener starts
SENDER, LISTENER_AE, RECEIVER_AE = "SENDER", "RSNA_ICH", "RESULTS"


def fake_predict(folder: Path, out: Path) -> list[Path]:
    """Probabilities from the slice index (not a model); one line per call in $FAKE_CALLS."""
    from competition.constants import LABELS
    from prediction import dicom_outputs
    from prediction.outputs import study_table
    from prediction.study import read_study

    study = read_study(folder)
    slices = study.metadata[["image_id", "study_id", "series_id", "slice_index", "z"]].copy()
    for k, label in enumerate(LABELS):
        slices[label] = (slices["slice_index"] + k) / (len(slices) + len(LABELS))
    studies = study_table(slices, {"threshold": 0.5})
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(f"{folder} {len(slices)}\n")
    algo = dicom_outputs.algorithm(["fake"], "fixed per slice index (test stand-in)", 0.5)
    return dicom_outputs.write_dicom(out / "dicom", dicom_outputs.read_sources(study), slices, studies, algo, {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A C-STORE SCP that keeps what it receives."""

    def __init__(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port, self.received, self.lock = free_port(), [], threading.Lock()
        ae = AE(ae_title=RECEIVER_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.store)])

    def store(self, event) -> int:
        with self.lock:
            self.received.append(event.dataset)
        return 0x0000

    def srs(self) -> list:
        with self.lock:
            return [ds for ds in self.received if ds.Modality == "SR"]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def start_listener(queue: Path, receiver: Receiver, settle: float, calls: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    script = ("import logging, sys; from pathlib import Path; from prediction.listener import *; "
              "from test_listener import fake_predict; logging.basicConfig(level=logging.INFO); "
              f"Listener(Queue(Path(sys.argv[1])), fake_predict, Destination.parse(sys.argv[2]), {settle}, "
              f"'{LISTENER_AE}').run('127.0.0.1', {port}, ['{SENDER}'], poll=0.2)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "FAKE_CALLS": str(calls)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(queue), f"127.0.0.1:{receiver.port}:{RECEIVER_AE}"],
                            cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while not echo(port, SENDER):
        assert proc.poll() is None, "the listener exited"
        assert time.monotonic() < deadline, "the listener did not answer C-ECHO within 60 s"
        time.sleep(0.2)
    return proc, port


def echo(port: int, calling: str) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status == 0x0000


def send(files: list[Path], port: int) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=SENDER)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
    assert assoc.is_established
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID  # the factory's files have it in the meta only
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def wait_for_sr(receiver: Receiver, timeout: float = 90) -> list:
    deadline = time.monotonic() + timeout
    while not receiver.srs() and time.monotonic() < deadline:
        time.sleep(0.2)
    return receiver.srs()


def series(tmp_path: Path, n: int) -> list[Path]:
    from test_dicom_outputs import synthetic_series

    return sorted(synthetic_series(tmp_path / "series", n=n).glob("*.dcm"))


def slice_groups(sr) -> list[str]:
    import highdicom as hd

    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    return sorted(g.tracking_identifier for g in parsed.content.get_image_measurement_groups()
                  if g.tracking_identifier.startswith("slice "))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_study_is_predicted_once_and_sent_back(tmp_path, receiver):
    files = series(tmp_path, 4)
    calls = tmp_path / "calls.log"
    proc, port = start_listener(tmp_path / "queue", receiver, settle=1.0, calls=calls)
    try:
        assert not echo(port, "INTRUDER"), "a calling AE off the allow list was accepted"
        send(files, port)
        srs = wait_for_sr(receiver)
        time.sleep(2.5)  # two more settle periods: nothing is predicted or sent again
    finally:
        stop(proc)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    assert len(receiver.srs()) == 1 and srs[0].StudyInstanceUID == study_uid
    assert slice_groups(srs[0]) == sorted(f"slice {f.stem}" for f in files)
    assert len(calls.read_text().splitlines()) == 1
    assert [p.name for p in (tmp_path / "queue" / "done").iterdir()] == [f"{study_uid}.1"]


@pytest.mark.slow  # ~40 s on a loaded 2-core machine: two listener starts and a settle period
def test_a_listener_killed_mid_study_finishes_it_exactly_once(tmp_path, receiver):
    files = series(tmp_path, 6)
    calls, queue = tmp_path / "calls.log", tmp_path / "queue"
    proc, port = start_listener(queue, receiver, settle=5.0, calls=calls)
    send(files[:3], port)
    proc.kill()  # SIGKILL: no cleanup
    proc.wait()
    stored = sorted(p.stem for p in (queue / "incoming").glob("*/*.dcm"))
    assert stored == sorted(f.stem for f in files[:3]), "acknowledged instances were not on disk"
    # The quiet time restarts with the listener: the first half waits for the second.
    proc, port = start_listener(queue, receiver, settle=5.0, calls=calls)
    try:
        send(files[3:], port)
        srs = wait_for_sr(receiver)
        time.sleep(3)
    finally:
        stop(proc)
    assert len(receiver.srs()) == 1
    assert slice_groups(srs[0]) == sorted(f"slice {f.stem}" for f in files)
    assert len(calls.read_text().splitlines()) == 1


def test_destination_and_queue_rounds(tmp_path):
    """DEST parsing; instances arriving after their study was predicted form a second round holding the
    whole study (predicted once more); the same instances sent again are not predicted again."""
    from prediction.listener import Destination, Listener, Queue, WebDestination, parse_destination

    assert Destination.parse("pacs.local:4242:ORTHANC") == Destination("pacs.local", 4242, "ORTHANC")
    assert parse_destination("dicomweb://pacs.local:8042/dicom-web") == WebDestination("dicomweb://pacs.local:8042/dicom-web")
    with pytest.raises(ValueError, match="host:port:AE_TITLE"):
        Destination.parse("pacs.local:ORTHANC")
    queue, predicted = Queue(tmp_path / "q"), []
    node = Listener(queue, lambda folder, out: predicted.append(sorted(p.name for p in folder.iterdir())) or [],
                    None, settle=5.0)
    node.started = 0.0
    for sop in ("1.1", "1.2"):
        queue.persist("1.2.3", sop, b"x")
    assert queue.settled(5.0, now=time.time()) == []
    assert queue.settled(5.0, now=time.time() + 10) == ["1.2.3"]
    first = queue.claim("1.2.3")
    assert first.name == "1.2.3.1" and sorted(p.name for p in (first / "input").iterdir()) == ["1.1.dcm", "1.2.dcm"]
    node.process(first)
    queue.persist("1.2.3", "1.3", b"y")
    queue.persist("1.2.3", "1.1", b"x again")  # a resent instance: its newest copy is the one read
    second = queue.claim("1.2.3")
    assert second.name == "1.2.3.2" and list(queue.incoming.iterdir()) == []
    node.process(second)
    assert predicted == [["1.1.dcm", "1.2.dcm"], ["1.1.dcm", "1.2.dcm", "1.3.dcm"]]
    assert (queue.done / "1.2.3.2" / "input" / "1.1.dcm").read_bytes() == b"x again"
    for sop in ("1.2", "1.3"):  # the same study sent again: a third round, not predicted
        queue.persist("1.2.3", sop, b"z")
    node.process(queue.claim("1.2.3"))
    assert len(predicted) == 2 and sorted(p.name for p in queue.done.iterdir()) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]


def test_a_crash_while_predicting_or_sending_is_resumed_once(tmp_path, monkeypatch):
    """In process, no network: a prediction that dies is run again after the restart (its partial output
    never left); a send that dies is retried with the same files, without predicting again."""
    import prediction.listener as listener_module
    from prediction.listener import Destination, Listener, Queue

    queue = Queue(tmp_path / "q")
    queue.persist("1.2.3", "1.1", b"x")
    predicted, sent = [], []

    def predict(folder: Path, out: Path) -> list[Path]:
        predicted.append(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sr.dcm").write_bytes(b"result")
        if len(predicted) == 1:
            raise RuntimeError("killed while predicting")
        return [out / "sr.dcm"]

    def send(files, destination, calling_ae):
        sent.append([f.name for f in files])
        if len(sent) == 1:
            raise ConnectionError("killed while sending")

    monkeypatch.setattr(listener_module, "send", send)
    dest = Destination("127.0.0.1", 1, "X")
    for attempt in range(3):  # each a fresh listener over the same queue, as after a restart
        node = Listener(queue, predict, dest, settle=0.0)
        node.started = 0.0
        try:
            node.step()
        except (RuntimeError, ConnectionError):
            pass
    assert len(predicted) == 2 and sent == [["sr.dcm"], ["sr.dcm"]]
    assert [p.name for p in queue.done.iterdir()] == ["1.2.3.1"] and not any(queue.work.iterdir())
