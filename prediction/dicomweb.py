"""DICOMweb (dicomweb-client): ``make predict STUDY=dicomweb://HOST:PORT/PATH/studies/UID`` retrieves a
study by WADO-RS, and ``make listen DEST=dicomweb://HOST:PORT/PATH`` stores results by STOW-RS.

``dicomweb://`` is plain HTTP, ``dicomwebs://`` HTTPS (a private CA: ``REQUESTS_CA_BUNDLE=/path/ca.pem``).
Credentials come from the environment only, never from the command line or the URL:
``DICOMWEB_TOKEN`` (sent as ``Authorization: Bearer``), or ``DICOMWEB_USER`` with ``DICOMWEB_PASSWORD``
(HTTP basic authentication).
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from competition.failures import FixableError

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
CREDENTIALS = "DICOMWEB_TOKEN, or DICOMWEB_USER and DICOMWEB_PASSWORD"
ATTEMPTS = 5  # tries per request (dicomweb-client's back-off: 2, 4, 8, 16 s between them) before a failure
UID = re.compile(r"[0-9A-Za-z._-]+")  # real UIDs are digits and dots; the Kaggle files' IDs have letters too


def is_dicomweb(text: object) -> bool:
    return isinstance(text, str) and text.split("://", 1)[0].lower() in SCHEMES and "://" in text


@dataclass(frozen=True)
class WebLocation:
    """A DICOMweb service root (``base``: http(s)://host:port/path) and, for STUDY=, one study in it."""
    text: str  # as the user wrote it, for messages
    base: str
    study_uid: str | None = None

    @classmethod
    def parse(cls, text: str, study: bool) -> "WebLocation":
        """``study``: the URL must end in /studies/<StudyInstanceUID> (STUDY=), else it must not (DEST=)."""
        form = "dicomweb://HOST:PORT/PATH" + ("/studies/<StudyInstanceUID>" if study else "")
        what = "STUDY" if study else "DEST"
        parts = urlsplit(text)
        if parts.scheme.lower() not in SCHEMES or not parts.hostname:
            raise ValueError(f"{what}={text!r} is not {form} (dicomwebs:// for HTTPS)")
        if parts.username or parts.password:
            raise ValueError(f"{what}={text!r} has credentials in it; remove them and set {CREDENTIALS} instead")
        if parts.query or parts.fragment:
            raise ValueError(f"{what}={text!r} has a query or fragment; give {form}")
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            raise ValueError(f"{what}={text!r} has a bad port; give {form}") from None
        path = parts.path.rstrip("/")
        head, sep, uid = path.rpartition("/studies/")
        if study and not (sep and UID.fullmatch(uid)):
            raise ValueError(f"{what}={text!r} does not end in /studies/<StudyInstanceUID>; give {form}")
        if not study and (sep or path.endswith("/studies")):
            raise ValueError(f"{what}={text!r} names studies; give the service root, {form} (e.g. .../dicom-web)")
        base = f"{SCHEMES[parts.scheme.lower()]}://{parts.hostname}{port}{head if study else path}"
        return cls(text, base, uid if study else None)


def client(location: WebLocation):
    """A DICOMweb client with the environment's credentials, if any."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    token, user = os.environ.get("DICOMWEB_TOKEN"), os.environ.get("DICOMWEB_USER")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, os.environ.get("DICOMWEB_PASSWORD", ""))
    statuses: list[int] = []  # the last answer's status: a 204 has no Content-Type for the client to parse
    session.hooks["response"].append(lambda response, *a, **k: statuses.append(response.status_code))
    web = DICOMwebClient(location.base, session=session, timeout=(20, 300))
    web.set_http_retry_params(retry=ATTEMPTS > 1, max_attempts=ATTEMPTS)
    web.statuses = statuses
    return web


def describe(location: WebLocation, exc: BaseException, doing: str) -> FixableError | None:
    """One line for a failed request (None: not a network or HTTP failure)."""
    import requests

    url = location.text
    if isinstance(exc, requests.exceptions.SSLError):
        return FixableError(f"{url}: TLS failed ({type(exc).__name__}); check the certificate, or point "
                            "REQUESTS_CA_BUNDLE at your CA file")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return FixableError(f"{url}: the DICOMweb server is unreachable ({type(exc).__name__}); check HOST and "
                            "PORT and that the server is running and reachable from here")
    if not isinstance(exc, requests.exceptions.HTTPError) or exc.response is None:
        if isinstance(exc, requests.exceptions.RequestException):  # e.g. the connection broke mid-study
            return FixableError(f"{url}: the transfer failed while {doing} ({type(exc).__name__}: "
                                f"{str(exc)[:120]}); run again")
        return None
    code = exc.response.status_code
    if code in (401, 403):
        given = "refused the credentials given" if has_credentials() else "needs credentials"
        return FixableError(f"{url}: the server {given} (HTTP {code}) while {doing}; set {CREDENTIALS} "
                            "to an account allowed to do that")
    if code == 404 and location.study_uid:
        return FixableError(f"{url}: study {location.study_uid} not found (HTTP 404); check the "
                            "StudyInstanceUID and the DICOMweb root in PATH (Orthanc: /dicom-web)")
    if code == 404:
        return FixableError(f"{url}: no DICOMweb service there (HTTP 404 while {doing}); check PATH "
                            "(Orthanc: /dicom-web)")
    dicom_json = exc.response.headers.get("Content-Type", "").startswith("application/dicom")  # tags, not words
    said = "" if dicom_json else " ".join(exc.response.text.split())[:200]
    return FixableError(f"{url}: the server answered HTTP {code} {exc.response.reason} while {doing}"
                        f"{f' ({said})' if said else ''}; see its log, then run again")


def has_credentials() -> bool:
    return bool(os.environ.get("DICOMWEB_TOKEN") or os.environ.get("DICOMWEB_USER"))


def instances(location: WebLocation) -> Iterator:
    """The study's instances as pydicom datasets, streamed (a CT study can be GBs), in the transfer
    syntax the server holds them in (no transcoding: the pixels are the ones it was sent)."""
    web = client(location)
    try:
        yield from web.iter_study(location.study_uid, media_types=(("application/dicom", "*"),))
    except (KeyError, ValueError) as exc:
        if web.statuses[-1:] == [204]:  # 204 No Content: nothing to retrieve
            return
        raise FixableError(f"{location.text}: the answer is not a multipart DICOM response ({exc}); check "
                           "that PATH is the DICOMweb root (Orthanc: /dicom-web)") from None
    except Exception as exc:
        raise describe(location, exc, "retrieving the study") or exc


def fetch_study(text: str, folder: Path) -> Path:
    """Retrieve the study at ``text`` (STUDY=dicomweb://...) into ``folder`` (replaced when complete:
    a failed retrieval leaves the previous copy, never a partial one); returns ``folder``."""
    from prediction.listener import safe_name

    location = WebLocation.parse(text, study=True)
    folder = Path(folder)
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    n = 0
    try:
        for ds in instances(location):
            ds.save_as(part / f"{safe_name(str(ds.get('SOPInstanceUID', n)))}.dcm")
            n += 1
    except BaseException:  # no partial copy is left behind
        shutil.rmtree(part, ignore_errors=True)
        raise
    if n == 0:
        shutil.rmtree(part)
        raise FixableError(f"{text}: the study has no instances on that server; check the StudyInstanceUID, "
                           "or send the study there first")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(part, folder)
    return folder


def store(files: Sequence[Path], text: str) -> None:
    """STOW-RS every file to the service root ``text`` (DEST=dicomweb://...); raises unless each is stored."""
    import pydicom

    location = WebLocation.parse(text, study=False)
    datasets = [pydicom.dcmread(f) for f in files]
    try:
        answer = client(location).store_instances(datasets)
    except Exception as exc:
        raise describe(location, exc, "storing results") or exc
    failed = answer.get("FailedSOPSequence", [])
    if failed:
        reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
        raise FixableError(f"{text}: the server refused {len(failed)} of {len(files)} result files "
                           f"(failure reasons {', '.join(reasons)}); see its log")
