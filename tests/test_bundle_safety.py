"""Unpacking a bundle never writes outside its folder: hand-made malicious tars, each refused by name.

Every archive lists its malicious member in a manifest with the right sha256, so the name and kind
checks of ``prediction.bundle.unpack`` are the only thing between the member and the disk: drop
one of them and the matching test here fails (the file lands outside, or no error is raised).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from prediction.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, BundleError, open_bundle, preprocessing, unpack

PAYLOAD = b"not a checkpoint\n"
BENIGN = "models/m/config.json"


def _file(name: str, data: bytes = PAYLOAD) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _tar(path: Path, entries, manifest: dict | None = None) -> Path:
    """A tar of a manifest listing every entry's name with PAYLOAD's hash, then the entries."""
    if manifest is None:
        manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "members": [],
                    "preprocessing": preprocessing([])}
    manifest.setdefault("files", {info.name: hashlib.sha256(PAYLOAD).hexdigest() for info, _ in entries})
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        raw = json.dumps(manifest).encode()
        info, data = _file("manifest.json", raw)
        tar.addfile(info, io.BytesIO(data))
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _unpack(tmp_path: Path, entries) -> Path:
    archive = _tar(tmp_path / "evil.tar", entries)
    into = tmp_path / "into"
    into.mkdir()
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        unpack(tar, manifest, into, archive)
    return into


def _refused(tmp_path: Path, entries, member: str) -> None:
    with pytest.raises(BundleError, match=re.escape(f"refusing member {member!r}")):
        _unpack(tmp_path, entries)


@pytest.fixture
def outside(tmp_path):
    """A folder beside the unpack folder; nothing may ever appear in it."""
    out = tmp_path / "outside"
    out.mkdir()
    yield out
    assert list(out.iterdir()) == [], "a bundle member was written outside the unpacked folder"


def test_a_benign_bundle_unpacks(tmp_path, outside):
    """The control: the same helpers with plain names unpack, so the refusals below are about the names."""
    into = _unpack(tmp_path, [_file(BENIGN), _file("models/m/fold0/best.pt")])
    assert (into / BENIGN).read_bytes() == PAYLOAD and (into / "models/m/fold0/best.pt").read_bytes() == PAYLOAD


def test_an_absolute_name_is_refused(tmp_path, outside):
    evil = str(outside / "evil")
    _refused(tmp_path, [_file(BENIGN), _file(evil)], evil)
    assert not Path(evil).exists()


@pytest.mark.parametrize("name", ["../outside/evil", "models/../../outside/evil"])
def test_a_name_climbing_out_is_refused(tmp_path, outside, name):
    _refused(tmp_path, [_file(BENIGN), _file(name)], name)
    assert not (outside / "evil").exists()


def test_a_backslash_name_is_refused(tmp_path, outside):
    name = "a\\..\\..\\outside\\evil"
    _refused(tmp_path, [_file(BENIGN), _file(name)], name)
    assert not (outside / "evil").exists() and not (tmp_path / "into" / name).exists()


def test_a_symlink_out_then_a_file_through_it_is_refused(tmp_path, outside):
    # `models` -> outside, then `models/evil`: extracted naively the file would land in outside/evil.
    _refused(tmp_path, [_link("models", str(outside), tarfile.SYMTYPE), _file("models/evil")], "models")
    assert not (outside / "evil").exists()


@pytest.mark.parametrize("target", ["../outside/evil", BENIGN])
def test_a_symlink_is_refused_wherever_it_points(tmp_path, outside, target):
    _refused(tmp_path, [_file(BENIGN), _link("models/m/link", target, tarfile.SYMTYPE)], "models/m/link")


@pytest.mark.parametrize("target", ["../outside/evil", BENIGN])
def test_a_hard_link_is_refused_wherever_it_points(tmp_path, outside, target):
    _refused(tmp_path, [_file(BENIGN), _link("models/m/hard", target, tarfile.LNKTYPE)], "models/m/hard")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE])
def test_a_device_fifo_or_folder_member_is_refused(tmp_path, outside, kind):
    info = tarfile.TarInfo("models/m/dev")
    info.type = kind
    _refused(tmp_path, [_file(BENIGN), (info, None)], "models/m/dev")


@pytest.mark.parametrize("name, folds", [(None, [0]), ("../../outside", [0]), ("a/b", [0]), (".", [0]),
                                         ("m", ["../../../outside"]), ("m", [-1])])
def test_a_model_name_or_fold_of_the_manifest_that_leaves_the_folder_is_refused(tmp_path, outside, name, folds):
    """``models/<name>/fold<k>`` is read from the members of the manifest: an absolute name replaces the root."""
    name = str(outside) if name is None else name
    member = {"name": name, "folds": folds, "combination": "brain_subdural_bone", "img_size": 64,
              "cache_size": 64, "crop": True}
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "members": [member], "files": {}}
    archive = _tar(tmp_path / "names.tar", [], manifest)
    with pytest.raises(BundleError, match=re.escape(f"refusing model {name!r}")):
        open_bundle(archive)
