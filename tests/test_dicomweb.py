"""prediction.dicomweb against a small DICOMweb server in the test (http.server, no Orthanc): the URL forms,
WADO-RS retrieval (the files read back equal to those served, by pydicom), credentials from the
environment, one line per failure, and STOW-RS as the listener's DEST, retried after a failed send
without predicting again. tests/test_orthanc.py runs the same against a real Orthanc (slow)."""
from __future__ import annotations

import base64
import email.parser
import io
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest

from competition.failures import FixableError
from prediction.dicomweb import WebLocation, fetch_study, is_dicomweb, store
from test_listener import free_port, series

BOUNDARY = "a-boundary-of-the-test"


class Server:
    """GET /dicom-web/studies/<uid> (multipart/related, 204 for EMPTY, 404 for others) and POST
    /dicom-web/studies (records the instances; the first ``fail_posts`` answer 500). With ``auth``, every
    request needs that Authorization header (401 otherwise)."""

    def __init__(self, studies: dict[str, list[bytes]], auth: str | None = None, fail_posts: int = 0):
        self.studies, self.auth, self.fail_posts = studies, auth, fail_posts
        self.stored: list[pydicom.Dataset] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if server.refused(self):
                    return
                head, _, uid = self.path.rpartition("/studies/")
                if head != "/dicom-web" or uid not in server.studies:
                    return self.answer(404)
                if not server.studies[uid]:
                    return self.answer(204)
                body = b"".join(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part
                                + b"\r\n" for part in server.studies[uid]) + b"--" + BOUNDARY.encode() + b"--"
                self.answer(200, body, f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')

            def do_POST(self):
                if server.refused(self):
                    return
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if server.fail_posts > 0:
                    server.fail_posts -= 1
                    return self.answer(500)
                message = email.parser.BytesParser().parsebytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
                server.stored += [pydicom.dcmread(io.BytesIO(p.get_payload(decode=True))) for p in message.get_payload()]
                self.answer(200, b"{}", "application/dicom+json")

            def answer(self, code: int, body: bytes = b"", kind: str | None = None):
                self.send_response(code)
                if kind:
                    self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def refused(self, handler) -> bool:
        if self.auth is not None and handler.headers.get("Authorization") != self.auth:
            handler.answer(401)
            return True
        return False

    def url(self, uid: str | None = None) -> str:
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web" + (f"/studies/{uid}" if uid else "")


@pytest.fixture
def study(tmp_path) -> list[Path]:
    return series(tmp_path, 3)


@pytest.fixture(autouse=True)
def one_try_no_credentials(monkeypatch):
    import prediction.dicomweb

    monkeypatch.setattr(prediction.dicomweb, "ATTEMPTS", 1)  # a refused connection fails at once, not after 30 s
    for name in ("DICOMWEB_TOKEN", "DICOMWEB_USER", "DICOMWEB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def serve(files: list[Path], **kwargs) -> tuple[Server, str]:
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    server = Server({uid: [f.read_bytes() for f in files], "EMPTY": []}, **kwargs)
    return server, uid


def test_url_forms():
    loc = WebLocation.parse("dicomwebs://pacs.example.org:8443/dicom-web/studies/1.2.840.5", study=True)
    assert (loc.base, loc.study_uid) == ("https://pacs.example.org:8443/dicom-web", "1.2.840.5")
    loc = WebLocation.parse("dicomweb://pacs/a/b/studies/ID_1f6d1e8aeb/", study=True)
    assert (loc.base, loc.study_uid) == ("http://pacs/a/b", "ID_1f6d1e8aeb")
    assert WebLocation.parse("dicomweb://127.0.0.1:8042/dicom-web/", study=False).base == "http://127.0.0.1:8042/dicom-web"
    assert is_dicomweb("DICOMWEB://h/x") and not is_dicomweb("study_folder") and not is_dicomweb(Path("dicomweb:/h"))
    bad = {("http://pacs/dicom-web/studies/1.2", True): "dicomweb://HOST:PORT",
           ("dicomweb://pacs/dicom-web/1.2", True): "does not end in /studies/",
           ("dicomweb://pacs/dicom-web/studies/1.2/series/3", True): "does not end in /studies/",
           ("dicomweb://me:secret@pacs/dicom-web/studies/1.2", True): "DICOMWEB_USER",
           ("dicomweb://pacs:port/dicom-web/studies/1.2", True): "bad port",
           ("dicomweb://pacs/dicom-web/studies/1.2", False): "service root"}
    for (text, is_study), message in bad.items():
        with pytest.raises(ValueError, match=message):
            WebLocation.parse(text, study=is_study)


def test_a_study_is_retrieved_into_a_folder(tmp_path, study):
    server, uid = serve(study)
    folder = fetch_study(server.url(uid), tmp_path / "out" / "source")
    got = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, folder.iterdir())}
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, study)}
    assert sorted(got) == sorted(sent)
    for sop, ds in sent.items():
        assert np.array_equal(got[sop].pixel_array, ds.pixel_array)
        assert got[sop].StudyInstanceUID == uid and got[sop].ImagePositionPatient == ds.ImagePositionPatient
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["source"]  # no .part left


def test_credentials_come_from_the_environment(tmp_path, study, monkeypatch):
    server, uid = serve(study, auth="Basic " + base64.b64encode(b"ana:s3cret").decode())
    with pytest.raises(FixableError, match="needs credentials.*DICOMWEB_USER"):
        fetch_study(server.url(uid), tmp_path / "a")
    monkeypatch.setenv("DICOMWEB_USER", "ana")
    monkeypatch.setenv("DICOMWEB_PASSWORD", "wrong")
    with pytest.raises(FixableError, match="refused the credentials given .HTTP 401"):
        fetch_study(server.url(uid), tmp_path / "a")
    monkeypatch.setenv("DICOMWEB_PASSWORD", "s3cret")
    assert len(list(fetch_study(server.url(uid), tmp_path / "a").iterdir())) == len(study)
    server.auth = "Bearer t0ken"
    monkeypatch.setenv("DICOMWEB_TOKEN", "t0ken")  # a token wins over user and password
    assert len(list(fetch_study(server.url(uid), tmp_path / "b").iterdir())) == len(study)


def test_one_line_per_failure(tmp_path, study):
    server, uid = serve(study)
    nobody = f"dicomweb://127.0.0.1:{free_port()}/dicom-web/studies/{uid}"
    cases = {nobody: "unreachable.*check HOST and PORT",
             server.url("1.2.3.4"): "study 1.2.3.4 not found .HTTP 404",
             server.url("EMPTY"): "has no instances",
             f"dicomweb://127.0.0.1:{server.port}/wrong/studies/{uid}": "not found"}
    for url, message in cases.items():
        with pytest.raises(FixableError, match=message) as caught:
            fetch_study(url, tmp_path / "out" / "source")
        assert str(caught.value).startswith(url) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_stow_rs_destination_is_retried_after_a_failed_send(tmp_path, study):
    """The listener's DEST=dicomweb://...: a send answered 500 leaves the study in work/ with its results;
    the next pass sends the same files, without predicting again."""
    from prediction.listener import Listener, Queue, WebDestination, parse_destination

    server, _ = serve(study, fail_posts=1)
    assert parse_destination(server.url()) == WebDestination(server.url())
    queue, predicted = Queue(tmp_path / "q"), []
    queue.persist("1.2.3", "1.1", b"x")

    def predict(folder: Path, out: Path) -> list[Path]:  # two of the series stand in for the results
        predicted.append(folder)
        out.mkdir(parents=True)
        return [Path(shutil.copy(f, out)) for f in study[:2]]

    node = Listener(queue, predict, parse_destination(server.url()), settle=0.0)
    node.started = 0.0
    with pytest.raises(FixableError, match="HTTP 500 .* while storing results"):
        node.step()
    assert [p.name for p in queue.work.iterdir()] == ["1.2.3.1"] and server.stored == []
    node.step()
    assert len(predicted) == 1 and [p.name for p in queue.done.iterdir()] == ["1.2.3.1"]
    sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in study[:2]}
    assert sorted(str(ds.SOPInstanceUID) for ds in server.stored) == sorted(sent)


def test_stow_rs_refusals(tmp_path, study):
    server, _ = serve(study, auth="Bearer right")
    with pytest.raises(FixableError, match="needs credentials .HTTP 401. while storing results"):
        store(study, server.url())
    with pytest.raises(FixableError, match="unreachable"):
        store(study, f"dicomweb://127.0.0.1:{free_port()}/dicom-web")


def test_predict_takes_a_study_url(tmp_path, capsys):
    """--study keeps a dicomweb:// URL whole (a Path would fold its //); a malformed one is argparse's one
    line; the default output folder is named after the StudyInstanceUID."""
    from competition.paths import WorkPaths
    from prediction.__main__ import parse
    from prediction.run import default_out

    url = "dicomweb://pacs:8042/dicom-web/studies/1.2.840.99"
    assert parse(["predict", "--study", url, "--bundle", "b.tar"]).study == url
    assert parse(["predict", "--study", "some/folder", "--bundle", "b.tar"]).study == Path("some/folder")
    with pytest.raises(SystemExit):
        parse(["predict", "--study", "dicomweb://pacs/dicom-web/1.2", "--bundle", "b.tar"])
    assert "does not end in /studies/<StudyInstanceUID>" in capsys.readouterr().err
    work = WorkPaths.for_data(tmp_path / "data", tmp_path / "work")
    assert default_out(url, work, None) == work.root / "predict" / "1.2.840.99"
