"""A stand-in of the Kaggle API on 127.0.0.1 that the installed `kaggle` command talks to.

The client (kaggle 2.2, kagglesdk) with ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` POSTs JSON to
``http://localhost/api/v1/competitions.CompetitionApiService/<Method>`` and honours ``HTTP_PROXY``
for that plain-HTTP endpoint, so this server, named as the proxy, receives every request (with the
absolute URL as its path). JSON names are those of the SDK's request/response classes
(kagglesdk/competitions/types/competition_api_service.py). Served:

- ListDataFiles, DownloadDataFiles (a redirect to the zip; the first transfer can be cut after
  ``cut_after`` bytes, and a ``Range`` request is answered with 206, as the client resumes with one);
- StartSubmissionUpload -> PUT to the returned URL -> CreateSubmission (the blob-upload flow);
- ListSubmissions: each submission is PENDING for ``pending_polls`` listings, then COMPLETE with
  its public and private scores (a function of the uploaded bytes, kept in ``submissions``).
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.server
import json
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SERVICE = "/api/v1/competitions.CompetitionApiService/"
ETAG = '"standin-v1"'
LAST_MODIFIED = "Mon, 04 Nov 2019 00:00:00 GMT"


def scores_of(content: bytes) -> tuple[float, float]:
    """Public and private scores the stand-in gives a file: distinct per content, in Kaggle's range."""
    h = int(hashlib.sha256(content).hexdigest()[:8], 16)
    return round(0.05 + (h % 10_000) / 100_000, 5), round(0.05 + (h // 10_000 % 10_000) / 100_000, 5)


@dataclass
class StandinState:
    competition: str
    username: str
    key: str
    archive: bytes = b""
    files: dict[str, int] = field(default_factory=dict)  # name -> size, for ListDataFiles
    cut_after: int | None = None  # cut the first archive transfer after this many bytes
    pending_polls: int = 1
    uploads: dict[str, bytes] = field(default_factory=dict)  # token -> bytes PUT
    names: dict[str, str] = field(default_factory=dict)  # token -> file name announced
    submissions: list[dict] = field(default_factory=list)  # newest last
    requests: list[str] = field(default_factory=list)  # "<method> <name>" of every request
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(http.server.BaseHTTPRequestHandler):
    state: StandinState  # set on the subclass the server is built with

    def log_message(self, *args) -> None:  # quiet test output
        pass

    # --- helpers -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: dict, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _authorized(self) -> bool:
        expected = "Basic " + base64.b64encode(f"{self.state.username}:{self.state.key}".encode()).decode()
        if self.headers.get("Authorization") == expected:
            return True
        self._json({"code": 401, "message": "Unauthenticated"}, 401)
        return False

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # --- verbs ---------------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        self.state.requests.append(f"POST {path.rsplit('/', 1)[-1]}")
        if not path.startswith(SERVICE):
            return self._json({"code": 404, "message": f"no route {path}"}, 404)
        if not self._authorized():
            return None
        method = path[len(SERVICE):]
        request = json.loads(body or b"{}")
        if request.get("competitionName") not in (None, self.state.competition):
            return self._json({"code": 404, "message": "competition not found"}, 404)
        handler = getattr(self, f"api_{method}", None)
        if handler is None:
            return self._json({"code": 404, "message": f"{method} not served by the stand-in"}, 404)
        return handler(request)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.state.requests.append(f"GET {path.rsplit('/', 1)[-1]}{' ' + self.headers['Range'] if self.headers.get('Range') else ''}")
        if path == f"/download/{self.state.competition}.zip":
            return self._serve_archive()
        return self._json({"code": 404, "message": f"no route {path}"}, 404)

    def do_PUT(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        self.state.requests.append(f"PUT {path.rsplit('/', 1)[-1]}")
        token = path.rsplit("/", 1)[-1]
        if not path.startswith("/upload/") or token not in self.state.uploads:
            return self._json({"code": 404, "message": "unknown upload"}, 404)
        self.state.uploads[token] = body
        return self._json({})

    # --- data ----------------------------------------------------------------------------------
    def api_ListDataFiles(self, request: dict) -> None:
        created = "2019-11-04T00:00:00.000Z"
        self._json({"files": [{"ref": n, "name": n, "totalBytes": s, "creationDate": created}
                              for n, s in self.state.files.items()], "nextPageToken": ""})

    def api_DownloadDataFiles(self, request: dict) -> None:
        self.send_response(302)
        self.send_header("Location", f"http://localhost/download/{self.state.competition}.zip")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve_archive(self) -> None:
        data, rng = self.state.archive, self.headers.get("Range")
        headers = {"Accept-Ranges": "bytes", "ETag": ETAG, "Last-Modified": LAST_MODIFIED}
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(206, data[start:], "application/zip", headers)
        with self.state.lock:
            cut, self.state.cut_after = self.state.cut_after, None
        if cut is None:
            return self._send(200, data, "application/zip", headers)
        self.send_response(200)  # announce everything, send a part, drop the connection
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.close_connection = True

    # --- submissions ---------------------------------------------------------------------------
    def api_StartSubmissionUpload(self, request: dict) -> None:
        with self.state.lock:
            token = f"blob-{len(self.state.uploads) + 1}"
            self.state.uploads[token] = b""
            self.state.names[token] = request.get("fileName", "")
        self._json({"token": token, "createUrl": f"http://localhost/upload/{token}"})

    def api_CreateSubmission(self, request: dict) -> None:
        content = self.state.uploads.get(request.get("blobFileTokens", ""))
        if not content:
            return self._json({"code": 400, "message": "nothing was uploaded under that token"}, 400)
        public, private = scores_of(content)
        with self.state.lock:
            ref = 1000 + len(self.state.submissions)
            self.state.submissions.append({
                "ref": ref, "fileName": self.state.names.get(request["blobFileTokens"], ""),
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "description": request.get("submissionDescription", ""), "content": content,
                "public": public, "private": private, "listings": 0})
        self._json({"message": "Successfully submitted to RSNA Intracranial Hemorrhage Detection", "ref": ref})

    def api_ListSubmissions(self, request: dict) -> None:
        rows = []
        with self.state.lock:
            for s in reversed(self.state.submissions):
                done = s["listings"] >= self.state.pending_polls
                s["listings"] += 1
                rows.append({"ref": s["ref"], "fileName": s["fileName"], "date": s["date"],
                             "description": s["description"], "status": "COMPLETE" if done else "PENDING",
                             **({"publicScore": f"{s['public']}", "privateScore": f"{s['private']}"} if done else {})})
        self._json({"submissions": rows, "nextPageToken": ""})

    def api_GetSubmissionLimits(self, request: dict) -> None:
        self._json({"numToday": len(self.state.submissions), "numTotal": len(self.state.submissions),
                    "numAllowedNow": 5})


class Standin:
    """The server in a daemon thread; ``env`` is what a `kaggle` subprocess needs to reach it."""

    def __init__(self, state: StandinState) -> None:
        handler = type("BoundHandler", (Handler,), {"state": state})
        self.state = state
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.server.server_address[1]}"
        return {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": proxy, "http_proxy": proxy,
                "NO_PROXY": "", "no_proxy": "",
                "KAGGLE_USERNAME": self.state.username, "KAGGLE_KEY": self.state.key}

    def __enter__(self) -> "Standin":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
