"""Unpacking a bundle never writes outside its folder: hand-made malicious tars, each refused by name.

Every archive lists its malicious member in a manifest with the right sha256, so the name and kind
checks of ``prediction.bundle.unpack`` are the only thing between the member and the disk: drop
one of them and the matching test here fails (the file lands outside, or no error is raised).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import prediction.bundle as bundle_module
from competition.constants import LABELS
from dicom_factory import random_stored, write_ct
from level2_stacking.fitted import FORMAT as FITTED_FORMAT
from level2_stacking.fitted import FittedStackError, load_fitted
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


def _fitted_bundle(path: Path, fitted: dict, extra: dict[str, bytes] | None = None, packages: dict | None = None
                   ) -> Path:
    """A bundle of no model whose only content is a fitted level 2 manifest (and ``extra`` files),
    each listed in the bundle's manifest with its true hash: only the name checks can refuse it."""
    files = {"stack/fitted/manifest.json": json.dumps(fitted).encode(), **(extra or {})}
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "members": [], "preprocessing": preprocessing([]),
                "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}, "packages": packages or {}}
    with tarfile.open(path, "w") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *files.items()]:
            info, data = _file(name, data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _booster_at(name: str) -> dict:
    return {"lightgbm": {"0": [{"file": name, "rounds": 1}]}, "sequence": {}, "maps": {}}


@pytest.mark.parametrize("name", ["/etc/passwd", "../../outside/evil", "lightgbm/../../../evil", "lightgbm/absent.txt",
                                  "a\\..\\..\\evil", 7])
def test_a_fitted_manifest_naming_a_file_outside_the_bundle_is_refused(tmp_path, outside, name):
    """stack/fitted/manifest.json is hashed, but the names inside it are read as ``root / name``."""
    archive = _fitted_bundle(tmp_path / "fitted.tar", _booster_at(name),
                             extra={"stack/fitted/lightgbm/fold0_any.txt": PAYLOAD})
    with pytest.raises(BundleError, match=re.escape(f"refusing file name {name!r}")):
        open_bundle(archive)


def test_a_fitted_manifest_naming_its_own_member_is_accepted(tmp_path):
    """The control: the same bundle naming a file it carries opens (loading it is test_prediction's)."""
    archive = _fitted_bundle(tmp_path / "fitted.tar", _booster_at("lightgbm/fold0_any.txt"),
                             extra={"stack/fitted/lightgbm/fold0_any.txt": PAYLOAD})
    assert (open_bundle(archive).root / "stack/fitted/lightgbm/fold0_any.txt").read_bytes() == PAYLOAD


def test_make_predict_refuses_such_a_bundle_in_one_line(tmp_path):
    archive = _fitted_bundle(tmp_path / "fitted.tar", _booster_at("/etc/passwd"))
    study = tmp_path / "study"
    study.mkdir()
    for k in range(3):  # a readable study: predict checks its input before it opens the bundle
        write_ct(study / f"ID_0000000{k}.dcm", random_stored(np.random.default_rng(k)), z=float(k))
    run = subprocess.run([sys.executable, "-m", "prediction", "predict", "--bundle", str(archive), "--study",
                          str(study), "--device", "cpu", "--no-report"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr and len(lines) == 1, run.stderr[-2000:]
    assert "refusing file name '/etc/passwd'" in lines[0] and str(archive) in lines[0]


def test_a_local_fitted_folder_naming_a_file_elsewhere_is_refused(tmp_path):
    root = tmp_path / "stack" / "fitted"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"format": FITTED_FORMAT, "labels": list(LABELS),
                                                    **_booster_at(str(tmp_path / "elsewhere.txt"))}))
    with pytest.raises(FittedStackError, match="refusing file name"):
        load_fitted(tmp_path / "stack")


def test_a_bundle_declaring_more_than_the_limit_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_module, "MAX_UNPACKED_BYTES", len(PAYLOAD) * 2 - 1)
    archive = _tar(tmp_path / "big.tar", [_file(BENIGN), _file("models/m/fold0/best.pt")])
    with pytest.raises(BundleError, match="would unpack to"):
        open_bundle(archive)


def test_a_bundle_from_another_lightgbm_says_so(tmp_path, capsys):
    archive = _fitted_bundle(tmp_path / "old.tar", _booster_at("lightgbm/fold0_any.txt"),
                             extra={"stack/fitted/lightgbm/fold0_any.txt": PAYLOAD}, packages={"lightgbm": "0.0.1"})
    open_bundle(archive)
    assert "lightgbm 0.0.1 (here " in capsys.readouterr().out


NAMES = ["lightgbm/fold0_any.txt", "maps/m_fold0.npz", "/etc/passwd", "../evil", "a/../../evil", "a\\b", "", ".",
         "./", "a/./b", 7, None, "C:/evil"]


@pytest.mark.parametrize("name", NAMES)
def test_the_bundle_and_the_fitted_folder_share_one_name_rule(tmp_path, name):
    """competition.safe_names decides for both; each agrees with a reference built on os.path."""
    from competition.safe_names import safe_relative_name
    from level2_stacking.fitted import inside

    plain = isinstance(name, str) and name != "" and "\\" not in name and not os.path.isabs(name) and not any(
        part in ("..", ".") for part in name.split("/") if part)
    plain = plain and os.path.normpath(name) not in (".", "")
    assert (safe_relative_name(name) is not None) == plain
    if plain:
        assert inside(tmp_path, name) == tmp_path / name
    else:
        with pytest.raises(FittedStackError, match="refusing file name"):
            inside(tmp_path, name)


def test_a_fitted_name_through_a_link_out_of_the_folder_is_refused(tmp_path, outside):
    from level2_stacking.fitted import inside

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "lightgbm").symlink_to(outside, target_is_directory=True)
    with pytest.raises(FittedStackError, match="refusing file name"):
        inside(tmp_path / "root", "lightgbm/fold0_any.txt")
