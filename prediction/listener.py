"""``make listen``: a DICOM node. Studies arrive by C-STORE, are predicted once they stop growing, and
their DICOM results (prediction.dicom_outputs) go back to a destination by C-STORE or STOW-RS.

The queue is a folder, so it survives a restart:

- ``incoming/<study>/<sop>.dcm``: each instance is written, fsynced and renamed into place BEFORE the
  C-STORE is acknowledged (a failed write answers 0xA700, so the sender keeps its copy).
- a study whose newest file is ``settle`` seconds old (counted from the listener's start at the
  earliest) moves (one rename) to ``work/<study>/input``;
  it is predicted into ``work/<study>/output``, and ``predicted.json`` (listing the result files) is
  written only when that finished; the files are then sent, ``sent.json`` written, and the folder
  moved to ``done/``.
- at start, ``work/`` is resumed: sent -> done; predicted -> sent (the same files, so the same SOP
  Instance UIDs: a receiver that got some already stores them again, not twice); neither -> the
  prediction is run again (its partial output was never sent). A study killed while arriving stays in
  ``incoming/`` and settles after the restart with what arrived before and after.

Instances of a study that arrive after it was predicted settle into a new round (``work/<study>.2``)
that holds the whole study: the earlier rounds' instances are linked in beside the new ones, so the
study is predicted once more as a whole, and its new results (new SOP Instance UIDs, a later series)
go beside the first ones. A round that brings no new SOP Instance UID (the same study sent again) is
not predicted nor sent again.

DEST is host:port:AE_TITLE (C-STORE) or dicomweb://HOST:PORT/PATH (STOW-RS, prediction.dicomweb);
either way a failed send leaves the study in work/ with ``predicted.json`` and is retried, with the same
files, on the next pass.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from competition.atomic import write_json

log = logging.getLogger("listener")
PredictFn = Callable[[Path, Path], Sequence[Path]]  # (folder of a study's files, output folder) -> result files
OUT_OF_RESOURCES = 0xA700


def safe_name(uid: str) -> str:
    """A UID as a file name (the competition's IDs and real UIDs are safe already)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", uid)[:128] or "unknown"


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> "Destination":
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
            raise ValueError(f"DEST={text!r} is not host:port:AE_TITLE (e.g. 127.0.0.1:4242:ORTHANC) "
                             "or dicomweb://HOST:PORT/PATH (STOW-RS)")
        return cls(parts[0], int(parts[1]), parts[2])


@dataclass(frozen=True)
class WebDestination:
    """DEST=dicomweb://HOST:PORT/PATH: results go by STOW-RS (prediction.dicomweb; credentials from the
    environment)."""
    url: str

    @classmethod
    def parse(cls, text: str) -> "WebDestination":
        from prediction.dicomweb import WebLocation

        WebLocation.parse(text, study=False)  # a bad DEST fails at start, not after the first study
        return cls(text)


def parse_destination(text: str) -> Destination | WebDestination:
    from prediction.dicomweb import is_dicomweb

    return WebDestination.parse(text) if is_dicomweb(text) else Destination.parse(text)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Queue:
    """The on-disk queue of studies (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming, self.work, self.done = (self.root / n for n in ("incoming", "work", "done"))
        for folder in (self.incoming, self.work, self.done):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # an arrival and the settling rename of its study never interleave

    def persist(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance durably; returns its path."""
        with self.lock:
            folder = self.incoming / safe_name(study_uid)
            folder.mkdir(exist_ok=True)
            target = folder / f"{safe_name(sop_uid)}.dcm"
            tmp = folder / f".{target.name}.part"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            fsync_dir(folder)
        return target

    def settled(self, settle: float, since: float = 0.0, now: float | None = None) -> list[str]:
        """Studies in incoming/ with no new file for ``settle`` seconds, oldest first; the quiet time
        counts from ``since`` at the earliest (the listener's start: senders cut off by a restart
        get a whole settle period to resume)."""
        now = time.time() if now is None else now
        ready = []
        for folder in self.incoming.iterdir():
            times = [p.stat().st_mtime for p in folder.iterdir()]
            newest = max([since, *times], default=folder.stat().st_mtime)
            if now - newest >= settle:
                ready.append((newest, folder.name))
        return [name for _, name in sorted(ready)]

    def claim(self, name: str) -> Path:
        """Move a settled study into work/ (a new round if that study is already there or done)."""
        with self.lock:
            round_ = 1
            while (self.work / f"{name}.{round_}").exists() or any(self.done.glob(f"{name}.{round_}")):
                round_ += 1
            target = self.work / f"{name}.{round_}"
            target.mkdir()
            os.replace(self.incoming / name, target / "input")
            fsync_dir(self.work)
        return target

    def earlier_rounds(self, job: Path) -> list[Path]:
        """The folders of the same study's earlier rounds (done/ or work/), newest first."""
        name, _, round_ = job.name.rpartition(".")
        return [folder / f"{name}.{k}" for k in range(int(round_) - 1, 0, -1) for folder in (self.done, self.work)
                if (folder / f"{name}.{k}" / "input").is_dir()]

    def merge_earlier(self, job: Path) -> int:
        """Link the earlier rounds' instances this round lacks into its input, so that it holds the whole
        study; returns how many instances are new in this round. Idempotent (resumed after a kill)."""
        inputs = job / "input"
        known: set[str] = set()
        for earlier in self.earlier_rounds(job):
            for f in (earlier / "input").glob("*.dcm"):
                known.add(f.name)
                if not (inputs / f.name).exists():  # a resent instance keeps its newest copy
                    link_or_copy(f, inputs / f.name)
        fsync_dir(inputs)
        return len({f.name for f in inputs.glob("*.dcm")} - known)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of a CT on disk), or a copy where links are not allowed; either way the
    name appears complete or not at all."""
    try:
        os.link(source, target)
    except OSError:
        tmp = target.with_name(f".{target.name}.part")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


class Listener:
    def __init__(self, queue: Queue, predict: PredictFn, destination: Destination | WebDestination | None,
                 settle: float, ae_title: str = "RSNA_ICH"):
        self.queue, self.predict, self.destination = queue, predict, destination
        self.settle, self.ae_title = settle, ae_title
        self.stop = threading.Event()
        self.started = time.time()

    def handle_store(self, event) -> int:
        """C-STORE: persist, then acknowledge."""
        try:
            study = str(event.dataset.get("StudyInstanceUID", "") or "unknown-study")
            self.queue.persist(study, str(event.request.AffectedSOPInstanceUID), event.encoded_dataset())
        except Exception:
            log.exception("could not store an instance; answering 0xA700 so the sender keeps it")
            return OUT_OF_RESOURCES
        return 0x0000

    def process(self, job: Path) -> None:
        """Predict (unless done before) and send (unless sent before) one claimed study."""
        predicted, sent = job / "predicted.json", job / "sent.json"
        if not predicted.exists():
            if self.queue.merge_earlier(job) == 0:  # the same instances sent again: already answered
                log.info("study %s: no new instance since its last round; not predicted again", job.name)
                write_json(predicted, {"files": [], "resent": True})
            else:
                files = [str(Path(p).relative_to(job)) for p in self.predict(job / "input", job / "output")]
                write_json(predicted, {"files": files})
        if not sent.exists():
            files = [job / f for f in json.loads(predicted.read_text())["files"]]
            if self.destination is not None and files:
                send(files, self.destination, self.ae_title)
            write_json(sent, {"to": None if self.destination is None else vars(self.destination),
                              "files": len(files), "at": time.time()})
        os.replace(job, self.queue.done / job.name)
        log.info("study %s done", job.name)

    def step(self) -> None:
        """One pass: resume work/, then claim and process what settled."""
        for job in sorted(self.queue.work.iterdir()):
            self.process(job)
        for name in self.queue.settled(self.settle, since=self.started):
            self.process(self.queue.claim(name))

    def run(self, host: str, port: int, allow: Sequence[str], poll: float = 0.5) -> None:
        server = start_server(self, host, port, allow)
        log.info("listening as %s on %s:%d for %s", self.ae_title, host, port, ", ".join(allow))
        try:
            while not self.stop.is_set():
                try:
                    self.step()
                except Exception:  # a failed study stays in work/ and is retried on the next pass
                    log.exception("prediction or sending failed; retrying in %.0f s", max(poll, self.settle))
                    self.stop.wait(max(poll, self.settle))
                self.stop.wait(poll)
        finally:
            server.shutdown()


def start_server(listener: Listener, host: str, port: int, allow: Sequence[str]):
    """The C-STORE SCP (every storage SOP class and transfer syntax), refusing calling AEs not in ``allow``."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=listener.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_calling_aet = list(allow)
    return ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, listener.handle_store)])


def send(files: Sequence[Path], destination: Destination | WebDestination, calling_ae: str) -> None:
    """C-STORE (or STOW-RS) every file to ``destination``; raises unless each one is stored."""
    import pydicom
    from pynetdicom import AE

    if isinstance(destination, WebDestination):
        from prediction.dicomweb import store

        return store(files, destination.url)

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, [str(t) for t in {ds.file_meta.TransferSyntaxUID for ds in datasets}])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"DEST {destination.host}:{destination.port}:{destination.ae_title} refused the "
                              "association; check its address, AE title and that it accepts this AE")
    try:
        for path, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0x0000:
                raise ConnectionError(f"DEST did not store {path.name} (status {status})")
    finally:
        assoc.release()


class ModelPredictor:
    """The trained ensemble, loaded once: a study folder in, its tables and DICOM results out."""

    def __init__(self, work=None, bundle: Path | None = None, models: Sequence[str] | None = None,
                 device: str = "auto", top: int = 3):
        from prediction.predictor import Predictor
        from prediction.run import load_ensemble

        self.ensemble = load_ensemble(work, bundle, models)
        self.predictor = Predictor(device).load(self.ensemble)
        self.top = top

    def __call__(self, folder: Path, out: Path) -> list[Path]:
        from prediction.dicom_outputs import write_dicom_results
        from prediction.outputs import study_table, write_tables
        from prediction.study import NothingToPredict, read_study

        try:
            scan = read_study(folder)
        except NothingToPredict as exc:  # e.g. only an SR or a scout was sent: nothing to answer
            log.warning("%s", exc)
            return []
        result = self.predictor.predict(scan)
        studies = study_table(result.slices, self.ensemble.threshold)
        write_tables(out, result.slices, studies, scan.skipped)
        return write_dicom_results(out / "dicom", result, studies, self.predictor, top=self.top)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prediction.listener", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="competition folder the models were trained on")
    parser.add_argument("--work", type=Path, help="work folder (default work/<basename of DATA>)")
    parser.add_argument("--bundle", type=Path, help="an archive written by `make export` (instead of DATA/WORK)")
    parser.add_argument("--models", help="comma list of level-1 models (default: every trained one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--top", type=int, default=3, help="Grad-CAM images per series")
    parser.add_argument("--ae-title", default="RSNA_ICH", help="this node's AE title")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=11112)
    parser.add_argument("--allow", required=True, help="comma list of calling AE titles allowed to send")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds without a new instance before predicting")
    parser.add_argument("--dest", help="where results go: host:port:AE_TITLE (C-STORE) or dicomweb://HOST:PORT/PATH "
                        "(STOW-RS; dicomwebs:// for HTTPS) (default: kept in the queue only)")
    parser.add_argument("--queue", type=Path, help="queue folder (default <work>/listen)")
    args = parser.parse_args(argv)
    if args.bundle is None and args.data is None and args.work is None:
        parser.error("listen needs --data/--work (a trained work folder) or --bundle (an exported archive)")
    if not [a for a in args.allow.split(",") if a.strip()]:
        parser.error("--allow needs at least one calling AE title (ALLOW=PACS,SCANNER)")
    return args


def main(argv: list[str] | None = None) -> int:
    from competition.paths import WorkPaths

    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = None if args.bundle else WorkPaths.for_data(args.data or ".", args.work)
    queue_root = args.queue or (work.root if work else Path("work") / args.bundle.name.split(".")[0]) / "listen"
    destination = parse_destination(args.dest) if args.dest else None
    models = [m for m in args.models.split(",") if m.strip()] if args.models else None
    predict = ModelPredictor(work, args.bundle, models, args.device, args.top)
    listener = Listener(Queue(queue_root), predict, destination, args.settle, args.ae_title)
    # SIGTERM (a service manager, `kill`) stops after the study in hand, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: listener.stop.set())
    listener.run(args.host, args.port, [a.strip() for a in args.allow.split(",") if a.strip()])
    return 0


if __name__ == "__main__":
    from competition.cli import run_main

    sys.exit(run_main(main, prog="python -m prediction.listener"))
