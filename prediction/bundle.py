"""``make export``: one tar of everything ``make predict`` needs, and the checked way back in.

Layout (one top folder, as MONAI bundles have)::

    manifest.json                    format and version, labels, members, threshold, windows, cache
                                     rule, package versions, and the sha256 of every other file
    models/<name>/config.json        the resolved training config
    models/<name>/fold<k>/best.pt    weights-only fold checkpoints
    stack/fitted/...                 the fitted level 2 (level2_stacking.fitted), when it was fit on
                                     exactly the exported models

Opening refuses anything that could write outside the unpacked folder (absolute names, ``..``,
links, devices), a file the manifest does not list or hashes differently, a bundle of another
format version, and preprocessing (windows, cache rule, label order) that this code would do
differently; checkpoints are then read with ``weights_only=True`` (level1_models.checkpoint).
"""
from __future__ import annotations

import atexit
import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath

from competition.atomic import atomic_path
from competition.constants import LABELS
from competition.diskspace import check_free_space
from competition.failures import human_bytes
from competition.paths import WorkPaths
from competition.safe_names import safe_relative_name
from competition.stamp import file_sha256
from features import crop as crop_rule
from features.cache import FORMAT as CACHE_FORMAT
from features.windows import PRESETS, get_combination
from level2_stacking.fitted import MANIFEST as FITTED_MANIFEST
from level2_stacking.fitted import fitted_dir, referenced_files
from prediction.ensemble import Ensemble, EnsembleError, Member, from_work
from prediction.level2 import why_not_stacked

BUNDLE_FORMAT = "rsna-ensemble-bundle"
BUNDLE_VERSION = 1  # bump when a bundle written before cannot be read the same way
MANIFEST = "manifest.json"
# A bound on what one bundle may unpack to: a 5-model x 5-fold ensemble of the largest specs is
# tens of GB; a tar whose headers declare more is refused before anything is written.
MAX_UNPACKED_BYTES = 512 << 30
VERSION_CHECKED = ("torch", "timm", "lightgbm")  # whose change can alter a prediction
PACKAGES = ("rsna-ensemble", "torch", "timm", "numpy", "pydicom", "opencv-python-headless", "lightgbm")


class BundleError(ValueError):
    """A bundle that cannot be used; the message names it and says what to do."""


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def preprocessing(members: Sequence[Member]) -> dict:
    """What the code does to pixels before a model sees them; a bundle must match it exactly."""
    windows = {}
    for m in members:
        comb = get_combination(m.combination)
        windows[m.combination] = {"transform": comb.transform,
                                  "channels": [[c.window, c.offset] for c in comb.channels]}
    return {
        "labels": list(LABELS),
        "cache_format": CACHE_FORMAT,
        "crop_rule": {"body_hu": crop_rule.BODY_HU, "margin": crop_rule.MARGIN, "min_side": crop_rule.MIN_SIDE},
        "combinations": windows,
        "presets": {name: [w.center, w.width] for name, w in sorted(PRESETS.items())},
    }


def bundle_files(ensemble: Ensemble, paths: WorkPaths) -> dict[str, Path]:
    """Archive name -> file on disk."""
    files = {}
    for m in ensemble.members:
        folder = ensemble.model_folder(m.name)
        files[f"models/{m.name}/config.json"] = folder.config
        for k in m.folds:
            files[f"models/{m.name}/fold{k}/best.pt"] = folder.best(k)
            files[f"models/{m.name}/fold{k}/done.json"] = folder.fold_done(k)  # its prior for unreadable slices
    fitted = fitted_dir(paths.stack)
    if ensemble.not_stacked is None:  # the level 2 fit on exactly these members
        for p in sorted(fitted.rglob("*")):
            if p.is_file():
                files[f"stack/{p.relative_to(paths.stack).as_posix()}"] = p
    return files


def export_bundle(paths: WorkPaths, out: Path | str, models: Sequence[str] | None = None) -> Path:
    """Write the bundle of the work folder's trained models (``models`` or all) to ``out``."""
    ensemble = from_work(paths, models)
    files = bundle_files(ensemble, paths)
    manifest = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "work_folder": paths.root.resolve().name,
        "packages": package_versions(), **ensemble.to_json(), "preprocessing": preprocessing(ensemble.members),
        "level2": "stack/fitted included" if ensemble.not_stacked is None else f"none: {ensemble.not_stacked}",
        "files": {name: file_sha256(path) for name, path in files.items()},
    }
    out = Path(out)
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w") as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, fileobj=io.BytesIO(data))
            for name, path in files.items():
                tar.add(path, arcname=name, recursive=False)
    return out


def read_manifest(tar: tarfile.TarFile, path: Path) -> dict:
    try:
        raw = tar.extractfile(MANIFEST)
        manifest = json.loads(raw.read()) if raw is not None else None
    except (KeyError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a bundle of this project (no {MANIFEST} of format {BUNDLE_FORMAT}); "
                          f"write one with `make export`")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path} is bundle format version {manifest.get('version')}, this project reads version "
                          f"{BUNDLE_VERSION}: export it again with `make export` in a checkout that matches")
    return manifest


def check_preprocessing(manifest: dict, members: Sequence[Member], path: Path) -> None:
    theirs, ours = manifest.get("preprocessing", {}), preprocessing(members)
    differ = [key for key in ours if theirs.get(key) != ours[key]]
    if differ:
        raise BundleError(f"{path} was trained with other preprocessing than this code does ({', '.join(differ)} "
                          f"differ): predictions would not be the models'; use the project version that exported it")


def check_member_names(members: Sequence[Member], path: Path) -> None:
    """Each model is read from ``models/<name>/fold<k>``: a name or fold that is not one plain part would leave it."""
    for m in members:
        if safe_relative_name(m.name) is None or PurePosixPath(m.name).parts != (m.name,) or not all(
                type(k) is int and k >= 0 for k in m.folds):
            raise BundleError(f"{path}: refusing model {m.name!r} (folds {list(m.folds)}) of its manifest: a model is "
                              f"one plain folder name with whole fold numbers; the archive was not written by "
                              f"`make export`")


def unpack(tar: tarfile.TarFile, manifest: dict, into: Path, path: Path) -> None:
    """Extract the listed files into ``into``, checking names, kinds and hashes."""
    listed = dict(manifest.get("files", {}))
    infos = tar.getmembers()
    total = sum(info.size for info in infos if info.isfile())
    if total > MAX_UNPACKED_BYTES:
        raise BundleError(f"{path} would unpack to {human_bytes(total)}, over the {human_bytes(MAX_UNPACKED_BYTES)} "
                          f"a bundle may hold; it was not written by `make export`")
    check_free_space(into, total, f"unpacking {path.name}", elsewhere="TMPDIR")
    for info in infos:
        if info.name == MANIFEST:
            continue
        name = safe_relative_name(info.name)
        if name is None or not info.isfile():
            raise BundleError(f"{path}: refusing member {info.name!r} (a path outside the bundle, a link or a "
                              f"device); the archive was not written by `make export`")
        if name not in listed:
            raise BundleError(f"{path}: member {name} is not in its manifest; the archive was changed after export")
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(info) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
            shutil.copyfileobj(src, dst)
        if file_sha256(target) != listed.pop(name):
            raise BundleError(f"{path}: {name} does not match the hash in its manifest (changed or corrupt); "
                              f"export the bundle again")
    if listed:
        raise BundleError(f"{path}: {len(listed)} file(s) of the manifest are missing (first: {next(iter(listed))}); "
                          f"the archive is incomplete: copy it again")


def check_fitted_names(manifest: dict, into: Path, path: Path) -> None:
    """Every file the fitted level 2 names must be one of the bundle's own hashed members."""
    fitted = Path(fitted_dir(Path("stack"))).as_posix()
    source = into / fitted / FITTED_MANIFEST
    if not source.is_file():
        return
    try:
        names = referenced_files(json.loads(source.read_text()))
    except (ValueError, AttributeError, TypeError):
        raise BundleError(f"{path}: {fitted}/{FITTED_MANIFEST} is not a fitted level 2 manifest; export the bundle "
                          f"again") from None
    listed = manifest.get("files", {})
    for name in names:
        safe = safe_relative_name(name)
        if safe is None or f"{fitted}/{safe}" not in listed:
            raise BundleError(f"{path}: refusing file name {name!r} of {fitted}/{FITTED_MANIFEST}: level 2 may read "
                              f"only the bundle's own files; the archive was not written by `make export`")


def open_bundle(path: Path | str, models: Sequence[str] | None = None) -> Ensemble:
    """The ensemble of a bundle, unpacked into a temporary folder that lives as long as the process."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bundle {path} not found; write one with `make export`")
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.TarError:
        raise BundleError(f"{path} is not a readable tar archive (truncated, or not a bundle); write it again with "
                          f"`make export`") from None
    with tar:
        manifest = read_manifest(tar, path)
        members = [Member(**{**m, "folds": tuple(m["folds"])}) for m in manifest["members"]]
        check_member_names(members, path)
        check_preprocessing(manifest, members, path)
        into = Path(tempfile.mkdtemp(prefix="rsna-bundle-"))
        atexit.register(shutil.rmtree, into, True)
        unpack(tar, manifest, into, path)
        check_fitted_names(manifest, into, path)
    if models:
        names = {m.name for m in members}
        if lacking := [m for m in models if m not in names]:
            raise EnsembleError(f"model(s) {lacking} are not in {path}; it holds {sorted(names)}")
        members = [m for m in members if m.name in models]
    ours = package_versions()
    changed = {k: (v, ours.get(k)) for k, v in manifest.get("packages", {}).items()
               if k in VERSION_CHECKED and v != ours.get(k)}
    if changed:
        print(f"note: {path} was exported with " + ", ".join(f"{k} {a} (here {b})" for k, (a, b) in changed.items()),
              flush=True)
    threshold = manifest.get("threshold", {})
    if len(members) < len(manifest["members"]) and threshold:
        print(f"note: the study threshold of {path} was chosen for all of its models; with MODELS= it is kept as is",
              flush=True)
    return Ensemble(into, members, threshold=threshold, source=str(path), not_stacked=why_not_stacked(into, members))


__all__ = ["BUNDLE_VERSION", "BundleError", "export_bundle", "open_bundle"]
