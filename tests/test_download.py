"""`make data`: the kaggle command, credentials, safe and resumable unzip. Nothing reaches the network."""
from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

import competition.kaggle_cli as kaggle_cli
from competition.constants import COMPETITION
from competition.download import UnsafeArchiveError, download_competition, is_complete_zip, safe_unzip
from competition.kaggle_cli import KaggleCredentialsError, check_credentials


@pytest.fixture()
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


@pytest.fixture()
def fake_kaggle(monkeypatch):
    """Record kaggle invocations instead of running them; the fake 'download' writes a small zip."""
    calls: list[list[str]] = []

    def run(cmd, check=False):
        calls.append(list(cmd))
        if cmd[1:3] == ["competitions", "download"]:
            target = Path(cmd[cmd.index("-p") + 1]) / f"{COMPETITION}.zip"
            with zipfile.ZipFile(target, "w") as z:
                z.writestr("stage_2_train.csv", "ID,Label\n")
                z.writestr("stage_2_train/ID_000000001.dcm", b"x" * 100)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(kaggle_cli.subprocess, "run", run)
    return calls


def test_no_credentials_is_one_clear_error(no_credentials, tmp_path, fake_kaggle):
    with pytest.raises(KaggleCredentialsError, match=r"kaggle\.json.*KAGGLE_USERNAME and KAGGLE_KEY"):
        download_competition(tmp_path / "data")
    assert fake_kaggle == []
    assert not (tmp_path / "data").exists()  # no empty DATA left behind to confuse the next command


def test_token_file_must_be_private_and_valid(no_credentials):
    token = no_credentials / ".kaggle" / "kaggle.json"
    token.parent.mkdir(parents=True)
    token.write_text(json.dumps({"username": "u", "key": "k"}))
    token.chmod(0o644)
    with pytest.raises(KaggleCredentialsError, match="chmod 600"):
        check_credentials()
    token.chmod(0o600)
    check_credentials()
    token.write_text("{not json")
    with pytest.raises(KaggleCredentialsError, match="not valid JSON"):
        check_credentials()


def test_download_command_and_unzip(no_credentials, tmp_path, monkeypatch, fake_kaggle):
    monkeypatch.setenv("KAGGLE_USERNAME", "user")
    monkeypatch.setenv("KAGGLE_KEY", "key")
    data = tmp_path / "data"
    download_competition(data)
    assert len(fake_kaggle) == 1
    assert Path(fake_kaggle[0][0]).name == "kaggle"
    assert fake_kaggle[0][1:] == ["competitions", "download", "-c", "rsna-intracranial-hemorrhage-detection", "-p", str(data)]
    assert (data / "stage_2_train" / "ID_000000001.dcm").read_bytes() == b"x" * 100
    download_competition(data)  # finished: nothing runs again
    assert len(fake_kaggle) == 1


def test_partial_download_is_restarted_not_used(no_credentials, tmp_path, monkeypatch, fake_kaggle):
    monkeypatch.setenv("KAGGLE_USERNAME", "user")
    monkeypatch.setenv("KAGGLE_KEY", "key")
    data = tmp_path / "data"
    data.mkdir()
    (data / f"{COMPETITION}.zip").write_bytes(b"PK\x03\x04 half a zip")
    assert not is_complete_zip(data / f"{COMPETITION}.zip")
    download_competition(data)
    assert len(fake_kaggle) == 1 and (data / "stage_2_train.csv").is_file()


@pytest.mark.parametrize("member", ["../escape.txt", "/etc/evil.txt", "a/../../escape.txt"])
def test_unzip_refuses_escaping_members_before_writing(tmp_path, member):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("fine.txt", "ok")
        z.writestr(member, "pwned")
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_unzip(archive, target, progress=False)
    assert not (target / "fine.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_unzip_resumes_and_replaces_half_files(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("d/one.bin", b"1" * 1000)
        z.writestr("d/two.bin", b"2" * 1000)
    target = tmp_path / "out"
    (target / "d").mkdir(parents=True)
    (target / "d" / "one.bin").write_bytes(b"1" * 1000)  # finished before the interruption
    (target / "d" / "two.bin").write_bytes(b"2" * 10)  # half written
    assert safe_unzip(archive, target, progress=False) == 1
    assert (target / "d" / "two.bin").read_bytes() == b"2" * 1000
    assert not list(target.rglob("*.partial*"))


def test_unzip_checks_free_space_first_and_a_full_disk_keeps_finished_files(tmp_path, monkeypatch):
    import errno
    import os
    import shutil as shutil_module
    from collections import namedtuple

    import competition.diskspace as diskspace
    import competition.download as download
    from competition.diskspace import NotEnoughSpaceError

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("d/one.bin", b"1" * 1000)
        z.writestr("d/two.bin", b"2" * 1000)
    target = tmp_path / "out"
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 1500, 1500))
    with pytest.raises(NotEnoughSpaceError, match=r"unzipping a.zip needs 2.0 KiB \(and 64.0 MiB to spare\) in .* but only 1.5 KiB is free; .* point DATA= at a larger disk"):
        safe_unzip(archive, target, progress=False)
    monkeypatch.undo()

    real_copy = shutil_module.copyfileobj

    def full_at_two(src, dst, length=0):
        if dst.name.endswith(f"two.bin.partial-{os.getpid()}"):
            dst.write(b"2" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst, length)

    monkeypatch.setattr(download.shutil, "copyfileobj", full_at_two)
    with pytest.raises(OSError, match="No space left"):
        safe_unzip(archive, target, progress=False)
    assert (target / "d" / "one.bin").read_bytes() == b"1" * 1000
    assert sorted(p.name for p in (target / "d").iterdir()) == ["one.bin"]  # no half file, under any name
    monkeypatch.undo()
    assert safe_unzip(archive, target, progress=False) == 1  # resumes with what is missing
