"""Head CTs as a PACS sends them (issue 25): pixel padding, missing rescale tags, partial and
repeated positions, linked and unreadable folders, truncated, multi-frame and dangling files, a
missing STUDY, and report titles with real UIDs. Each case on synthetic files (always run) and,
where it matters, on copies of the real series altered with pydicom (skipped without it)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from competition.dicom import DicomReadError, read_hu
from competition.hu_rules import AIR_HU
from dicom_factory import write_ct
from prediction.study import NothingToPredict, read_study

PAD = 63536  # a GE-style padding word (-2000 as int16)


def edit(path: Path, dst: Path | None = None, drop: tuple[str, ...] = (), **fields) -> Path:
    """Rewrite a DICOM file with ``fields`` set and ``drop`` removed (to ``dst``, default in place)."""
    ds = pydicom.dcmread(path)
    for key, value in fields.items():
        if key.startswith("PixelPadding"):  # 'US or SS': pydicom needs the VR the pixels imply
            ds.add_new(key, "SS" if ds.PixelRepresentation else "US", value)
        else:
            setattr(ds, key, value)
    for key in drop:
        if key in ds:
            delattr(ds, key)
    dst = dst or path
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def head_with_padding(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """12-bit tissue inside a disc (some pixels exactly 2096, what 63536 masks to) and PAD outside."""
    yy, xx = np.mgrid[:size, :size]
    outside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 > (size / 2.5) ** 2
    stored = rng.integers(0, 4096, (size, size)).astype(np.uint16)
    stored[size // 2, : size // 2] = 2096
    stored[outside] = PAD
    return stored, outside


# --- pixel padding -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits_stored", [12, 16])
def test_padding_is_air_and_tissue_is_pydicoms_hu(tmp_path, bits_stored):
    stored, _ = head_with_padding(np.random.default_rng(bits_stored))
    path = write_ct(tmp_path / "ID_pad.dcm", stored, bits_stored=bits_stored)
    edit(path, PixelPaddingValue=PAD)
    ds = pydicom.dcmread(path)
    words = np.frombuffer(ds.PixelData, "<u2").reshape(stored.shape)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    expected[words == PAD] = AIR_HU  # the padding, found on the words as written
    np.testing.assert_array_equal(read_hu(path), expected)
    # Unpadded, the same file reads as pydicom does: the ring of +1,072 (or 62,512) HU of the issue.
    bright = apply_modality_lut(ds.pixel_array, ds)[words == PAD]
    assert bright.min() >= 1072 and read_hu(path)[words == PAD].max() == AIR_HU
    assert (read_hu(path)[stored == 2096] == 2096 - 1024).all()  # bone at 1,072 HU is not padding


def test_padding_range_limit_on_signed_pixels(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.integers(-2100, 2000, (40, 40)).astype(np.int16)
    path = write_ct(tmp_path / "ID_range.dcm", values.view(np.uint16), bits_stored=16, pixel_representation=1,
                    intercept=0)
    edit(path, PixelPaddingValue=-1500, PixelPaddingRangeLimit=-2000)  # either order is a range
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    expected[(ds.pixel_array >= -2000) & (ds.pixel_array <= -1500)] = AIR_HU
    got = read_hu(path)
    np.testing.assert_array_equal(got, expected)
    assert ((values >= -2000) & (values <= -1500)).sum() > 100 and (got[values < -2000] < -2000).all()


# --- missing rescale tags ----------------------------------------------------------------------
def _without_rescale(tmp_path: Path, stored: np.ndarray, name: str, **kwargs) -> Path:
    return edit(write_ct(tmp_path / f"{name}.dcm", stored, **kwargs), drop=("RescaleSlope", "RescaleIntercept"))


def test_unsigned_ct_without_rescale_gets_minus_1024_and_a_note(tmp_path):
    stored = np.random.default_rng(4).integers(0, 4096, (32, 32)).astype(np.uint16)
    stored[0] = 0  # air
    path = _without_rescale(tmp_path, stored, "ID_norescale")
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024  # the convention, applied by pydicom
    np.testing.assert_array_equal(read_hu(path), apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    study = read_study(tmp_path)
    assert study.warnings["warning"].str.contains("no RescaleSlope/RescaleIntercept .*intercept -1024 applied").all()


def test_signed_ct_without_rescale_is_taken_as_hu(tmp_path):
    values = np.random.default_rng(5).integers(-1024, 2000, (32, 32)).astype(np.int16)
    path = _without_rescale(tmp_path, values.view(np.uint16), "ID_signed", bits_stored=16, pixel_representation=1)
    np.testing.assert_array_equal(read_hu(path), values.astype(np.float32))
    assert "signed pixels taken as HU" in read_study(tmp_path).warnings["warning"].iloc[0]


def test_unsigned_values_beyond_the_ct_range_without_rescale_are_refused(tmp_path):
    stored = np.random.default_rng(6).integers(1000, 60000, (32, 32)).astype(np.uint16)
    path = _without_rescale(tmp_path, stored, "ID_unknown", bits_stored=16)
    with pytest.raises(DicomReadError, match="no RescaleSlope/RescaleIntercept .* HU cannot be told"):
        read_hu(path)


def test_only_the_slope_missing_assumes_one(tmp_path):
    stored = np.random.default_rng(7).integers(0, 4096, (16, 16)).astype(np.uint16)
    path = edit(write_ct(tmp_path / "ID_noslope.dcm", stored), drop=("RescaleSlope",))
    np.testing.assert_array_equal(read_hu(path), stored.astype(np.float32) - 1024)
    assert "slope 1 assumed" in read_study(tmp_path).warnings["warning"].iloc[0]


# --- partial and repeated positions ------------------------------------------------------------
def head_slice(i: int, n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Slice i of n through a synthetic head: a disc growing along the series (so neighbours look
    alike and no two slices far apart do), soft tissue inside, air outside, a little noise."""
    yy, xx = np.mgrid[:size, :size]
    radius = size * (0.1 + 0.35 * (i + 0.5) / n)
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    return (np.where(inside, 1064, 24) + rng.integers(0, 8, (size, size))).astype(np.uint16)


def write_series(folder: Path, z: list[float], **per_slice) -> list[Path]:
    """One slice per z (``head_slice`` in list order), named in no z order; ``per_slice`` lists of
    write_ct arguments."""
    rng = np.random.default_rng(len(z))
    names = [f"ID_{h:09x}" for h in rng.permutation(len(z)) * 7919 + 4096]
    return [write_ct(folder / f"{name}.dcm", head_slice(i, len(z), rng), z=zi,
                     **{k: v[i] for k, v in per_slice.items()}) for i, (name, zi) in enumerate(zip(names, z))]


def test_partial_positions_keep_z_and_place_the_others_by_instance_number(tmp_path):
    z = [100.0 - 5 * i for i in range(12)]  # InstanceNumber rises as z falls
    known = [zi if i % 4 else None for i, zi in enumerate(z)]
    paths = write_series(tmp_path / "s", known, instance_number=list(range(1, 13)))
    study = read_study(tmp_path / "s")
    truth = [p.stem for _, p in sorted(zip(z, paths))]  # the true z order, from the z each file was made at
    assert study.metadata["image_id"].tolist() == truth
    warned = study.warnings.set_index("path")["warning"]
    assert sorted(warned.index) == sorted(f"{p.name}" for p, k in zip(paths, known) if k is None)
    assert warned.str.contains("no ImagePositionPatient: placed in series .* by InstanceNumber \\(fitted to z on 9").all()


def test_slice_location_then_nothing(tmp_path):
    z = [10.0 * i for i in range(8)]
    paths = write_series(tmp_path / "s", [zi if i not in (2, 5) else None for i, zi in enumerate(z)])
    for i, path in enumerate(paths):  # SliceLocation runs against z, from another origin; none on slice 5
        if i != 5:
            edit(path, SliceLocation=50.0 - z[i])
    study = read_study(tmp_path / "s")
    assert study.metadata["image_id"].tolist() == [p.stem for p in paths]  # the true order
    warned = study.warnings.set_index("path")["warning"]
    assert "by SliceLocation (fitted to z on 6 slices" in warned[paths[2].name]
    assert warned[paths[5].name] == (
        f"no ImagePositionPatient, SliceLocation or InstanceNumber: placed in series ID_00000000bb next to "
        f"{paths[4].name} and {paths[6].name} by image similarity (its pixels fit best there)")
    # The metadata pass has no pixels: there the slice goes after the placed ones, by image id.
    from competition.slice_order import NO_EVIDENCE, add_slice_order
    notes: list = []
    ordered = add_slice_order(study.metadata.drop(columns=["slice_index", "n_slices"]), notes).sort_values("slice_index")
    assert ordered["image_id"].tolist()[-1] == paths[5].stem and notes[-1] == (
        paths[5].name, f"no ImagePositionPatient: placed in series ID_00000000bb by {NO_EVIDENCE}")


def test_repeated_positions_keep_one_in_predict_and_both_in_prepare(tmp_path):
    paths = write_series(tmp_path / "s", [0.0, 5.0, 10.0], instance_number=[1, 2, 3])
    again = edit(paths[1], tmp_path / "s" / "again.dcm", SOPInstanceUID="ID_again0001", InstanceNumber=7)
    study = read_study(tmp_path / "s")
    assert study.metadata["image_id"].tolist() == [p.stem for p in paths]
    reason = study.skipped.set_index("path").at[again.name, "reason"]
    assert f"same position as {paths[1].name}" in reason and "identical pixels" in reason

    from competition.slice_order import duplicate_positions
    table = study.metadata.assign(path=study.metadata["path"])
    both = pd.concat([table, table.iloc[[1]].assign(image_id="ID_again0001", path="again.dcm", instance_number=7.0)])
    assert duplicate_positions(both)[["image_id", "kept_id"]].values.tolist() == [["ID_again0001", paths[1].stem]]


# --- folders: links, loops, permissions --------------------------------------------------------
def test_linked_series_folder_is_followed_and_a_loop_listed(tmp_path):
    series = tmp_path / "elsewhere" / "series"
    paths = write_series(series, [0.0, 5.0, 10.0])
    study = tmp_path / "study"
    study.mkdir()
    (study / "linked").symlink_to(series, target_is_directory=True)
    (series / "loop").symlink_to(series, target_is_directory=True)  # a link back to its own folder
    (study / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    scan = read_study(study)
    assert sorted(scan.metadata["image_id"]) == sorted(p.stem for p in paths)
    skipped = scan.skipped.set_index("path")["reason"]
    assert "already scanned as linked/" in skipped["linked/loop/"]
    assert skipped["gone.dcm"].startswith("dangling symbolic link") and "DATA" not in skipped["gone.dcm"]


def test_unreadable_folder_is_listed_with_the_permission_reason(tmp_path, monkeypatch):
    write_series(tmp_path / "study" / "open", [0.0, 5.0])
    write_series(tmp_path / "study" / "locked", [10.0, 15.0, 20.0])
    locked = tmp_path / "study" / "locked"
    if os.geteuid() == 0:  # root reads any folder: make this one refuse as it would for a user
        real = os.scandir
        monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "denied", str(p)))
                            if Path(p) == locked else real(p))
    locked.chmod(0)
    try:
        scan = read_study(tmp_path / "study")
    finally:
        locked.chmod(0o755)
    assert len(scan.metadata) == 2
    assert scan.skipped.values.tolist() == [["locked/", scan.skipped["reason"].iloc[0]]]
    assert scan.skipped["reason"].iloc[0].startswith("permission denied: this folder cannot be listed")


# --- files: truncated, multi-frame; a missing or empty STUDY ------------------------------------
def test_truncated_header_and_multi_frame_say_so(tmp_path):
    paths = write_series(tmp_path / "s", [0.0, 5.0, 10.0])
    paths[0].write_bytes(paths[0].read_bytes()[:300])
    edit(paths[1], NumberOfFrames=2, Rows=16)  # the 32 x 32 pixels as two 16 x 32 frames
    skipped = read_study(tmp_path / "s").skipped.set_index("path")["reason"]
    assert skipped[paths[0].name].startswith("truncated file (300 bytes)")
    assert "multi-frame objects are not supported" in skipped[paths[1].name]


def test_missing_or_empty_study_fails_before_the_models_load(tmp_path, monkeypatch):
    import prediction.run as run

    monkeypatch.setattr(run, "load_ensemble", lambda *a: pytest.fail("models loaded before the input check"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NothingToPredict, match="the folder is empty"):
        run.predict_folder(tmp_path / "empty", bundle=tmp_path / "b.tar")
    with pytest.raises(NothingToPredict, match="does not exist"):
        run.predict_folder(tmp_path / "absent", bundle=tmp_path / "b.tar")


# --- report titles -----------------------------------------------------------------------------
UID = "1.2.826.0.1.3680043.8.498." + "10236735649845379125384290541839657721"  # 64 characters


def test_panel_title_keeps_both_ends_of_a_uid():
    from prediction.report import panel_figure, panel_title, shorten_middle

    assert len(UID) == 64
    title = panel_title(UID, "any = 0.558 (ensemble); explained by some_model fold 0 (p = 0.512, one view), "
                             "Grad-CAM layer backbone.layer4.2.conv3")
    assert title.splitlines()[0] == UID
    longer = shorten_middle("1.2.3." + "9" * 200 + ".42", 100)
    assert len(longer) == 100 and longer.startswith("1.2.3.") and longer.endswith(".42")
    fig = panel_figure(np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8)), title)
    fig.canvas.draw()
    box, page = fig._suptitle.get_window_extent(), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1  # nothing cut at either end
    assert box.y0 >= max(ax.title.get_window_extent().y1 for ax in fig.axes)  # nor under the panels


# --- the real series, altered ------------------------------------------------------------------
def copy_real(real_sample: Path, dst: Path) -> list[Path]:
    shutil.copytree(real_sample / "stage_2_test", dst)
    return sorted(dst.glob("*.dcm"))


def test_real_series_with_padding(real_sample, tmp_path):
    paths = copy_real(real_sample, tmp_path / "s")
    for path in paths:
        ds = pydicom.dcmread(path)
        words = ds.pixel_array.copy()
        yy, xx = np.mgrid[:512, :512]
        words[(yy - 256) ** 2 + (xx - 256) ** 2 > 250**2] = PAD
        ds.PixelData = words.tobytes()
        ds.save_as(path)
        edit(path, PixelPaddingValue=PAD)
    ds = pydicom.dcmread(paths[0])
    words = np.frombuffer(ds.PixelData, "<u2").reshape(512, 512)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    expected[words == PAD] = AIR_HU
    np.testing.assert_array_equal(read_hu(paths[0]), expected)
    study = read_study(tmp_path / "s")
    assert len(study.metadata) == 32 and (study.warnings["warning"] == "pixel padding (PixelPaddingValue 63536) set to air, -1000 HU").sum() == 32


def test_real_series_with_partial_positions(real_sample, tmp_path):
    paths = copy_real(real_sample, tmp_path / "s")
    z = {p.stem: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in paths}
    dropped = paths[::5][:7]
    for path in dropped:
        edit(path, drop=("ImagePositionPatient",))
    study = read_study(tmp_path / "s")
    kept = sorted((p.stem for p in paths if p not in dropped), key=z.get)
    # No InstanceNumber or SliceLocation in these files: the 25 keep their z order, the 7 are
    # placed by their pixels, each at its true place.
    assert study.metadata["image_id"].tolist() == sorted(z, key=z.get)
    assert study.metadata.set_index("image_id").loc[kept, "slice_index"].is_monotonic_increasing
    assert len(study.warnings) == 7 and study.warnings["warning"].str.contains("by image similarity").all()


# --- make prepare: the same reader, the same notes, the same pixels ------------------------------
def test_prepare_notes_and_caches_what_predict_reads(tmp_path, capsys):
    from competition.metadata import build_metadata
    from dicom_factory import write_mini_competition
    from features.cache import ImageCache, build_cache
    from prediction.preprocess import MemoryCache

    data = write_mini_competition(tmp_path / "data", patients=2, slices=2)
    test = data / "stage_2_test"
    rng = np.random.default_rng(9)
    padded = [write_ct(test / f"ID_00000p{i:03d}.dcm", head_with_padding(rng)[0], series="ID_padseries", z=5.0 * i)
              for i in range(3)]
    for path in padded:
        edit(path, PixelPaddingValue=PAD)
    norescale = _without_rescale(test, rng.integers(0, 4096, (16, 16)).astype(np.uint16), "ID_00000n001",
                                 series="ID_plainserie", z=None, instance_number=3)
    for i in (1, 2):
        write_ct(test / f"ID_00000n00{i + 1}.dcm", rng.integers(0, 4096, (16, 16)).astype(np.uint16),
                 series="ID_plainserie", z=10.0 * i, instance_number=i)
    edit(test / "ID_00000n002.dcm", test / "ID_00000n009.dcm", SOPInstanceUID="ID_00000n009")  # same position

    work = tmp_path / "work"
    meta = build_metadata(data, work / "metadata.parquet", workers=1, progress=False, bad_files_csv=work / "bad_files.csv")
    err = capsys.readouterr().err
    notes = pd.read_csv(work / "reader_notes.csv").groupby("path")["note"].agg(" | ".join)
    line = next(x for x in err.splitlines() if "pixel padding" in x)  # one line for the series' three files
    assert line.startswith("note: 3 files (stage_2_test/ID_00000p000.dcm, ") and line.endswith(
        "): pixel padding (PixelPaddingValue 63536) set to air, -1000 HU")
    assert "intercept -1024 applied" in notes[f"stage_2_test/{norescale.name}"]
    assert "placed in series ID_plainserie by InstanceNumber" in notes[f"stage_2_test/{norescale.name}"]
    assert "same position as stage_2_test/ID_00000n002.dcm" in notes["stage_2_test/ID_00000n009.dcm"]
    assert len(notes) == 5  # the three padded, the one without rescale or position, the repeat
    assert "ID_00000n009" in set(meta["image_id"])  # kept: the submission needs every image's row
    plain = meta[meta["series_id"] == "ID_plainserie"].sort_values("slice_index")["image_id"].tolist()
    assert plain[:2] == ["ID_00000n002", "ID_00000n009"] and plain[-2:] == ["ID_00000n003", "ID_00000n001"]

    build_cache(data, meta, work / "cache", size=32, workers=1, progress=False)
    cache = ImageCache(work / "cache", 32)
    study = read_study(test)
    memory = MemoryCache(study.metadata, study.hu, 32)
    for path in padded + [norescale]:
        np.testing.assert_array_equal(cache.read_hu(path.stem), memory.read_hu(path.stem))
    assert cache.read_hu(padded[0].stem).min() == AIR_HU


# --- make predict end to end: the terminal, run.json and the report say the same -----------------
@pytest.mark.slow
def test_predict_says_each_case_in_terminal_run_json_and_report(tmp_path, capsys):
    import json

    from conftest import prepare_tiny_competition
    from level1_models.train import run_model
    from prediction.run import predict_folder

    data, paths = prepare_tiny_competition(tmp_path / "c")
    run_model("tiny_resnet", data, paths.root, dict(epochs=1, img_size=32, batch_size=16, workers=0, device="cpu",
                                                     augment=False, pretrained=False))
    study = tmp_path / "study"
    series = write_series(tmp_path / "series", [0.0, 5.0, None, 15.0], instance_number=[1, 2, 3, 4])
    (study / "linked").parent.mkdir(parents=True)
    (study / "linked").symlink_to(tmp_path / "series", target_is_directory=True)
    edit(series[1], study / "again.dcm", SOPInstanceUID="ID_again0001", InstanceNumber=9)
    (study / "gone").symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    out = predict_folder(study, paths, out=tmp_path / "out", device="cpu", top=1)
    err = capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    page = (out / "report.html").read_text()
    expected_skips = {"again.dcm": "same position as linked/", "gone": "dangling symbolic link"}
    expected_warnings = {f"linked/{series[2].name}": "placed in series ID_00000000bb by InstanceNumber"}
    for kind, expected, listed in (("skipped", expected_skips, run["skipped"]), ("warning", expected_warnings, run["warnings"])):
        for path, words in expected.items():
            line = next(x for x in err.splitlines() if x.startswith(f"{kind}: {path}: "))
            assert words in line
            assert any(r["path"] == path and words in r["reason" if kind == "skipped" else "warning"] for r in listed)
            assert html_escape(path) in page
    assert "<h2>Warnings" in page and "<h2>Skipped files (2)</h2>" in page
    assert pd.read_csv(out / "slices.csv")["image_id"].tolist() == [p.stem for p in series]


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_prepare_lists_a_dangling_link_as_a_bad_file(tmp_path):
    from competition.metadata import build_metadata
    from dicom_factory import write_mini_competition

    data = write_mini_competition(tmp_path / "data", patients=2, slices=2)
    (data / "stage_2_train" / "ID_00000dead.dcm").symlink_to(tmp_path / "moved" / "ID_00000dead.dcm")
    build_metadata(data, tmp_path / "w" / "metadata.parquet", workers=1, progress=False,
                   bad_files_csv=tmp_path / "w" / "bad_files.csv")
    bad = pd.read_csv(tmp_path / "w" / "bad_files.csv").set_index("image_id")["reason"]
    assert bad["ID_00000dead"].startswith("dangling symbolic link (its target ") and "moved" in bad["ID_00000dead"]


def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    paths = write_series(tmp_path / "s", [0.0, 5.0])
    if os.geteuid() == 0:  # root reads any file: make this one refuse as it would for a user
        import pydicom.filereader as reader
        real = reader.dcmread
        monkeypatch.setattr(pydicom, "dcmread", lambda fp, *a, **k: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(fp))) if Path(str(fp)) == paths[0] else real(fp, *a, **k))
    paths[0].chmod(0)
    try:
        skipped = read_study(tmp_path / "s").skipped.set_index("path")["reason"]
    finally:
        paths[0].chmod(0o644)
    assert skipped[paths[0].name].startswith("permission denied: the file cannot be read")


def test_a_gap_in_z_is_named_and_an_even_series_is_not(tmp_path):
    z = [5.0 * i for i in range(12)]
    write_series(tmp_path / "whole", z)
    assert read_study(tmp_path / "whole").warnings.empty
    paths = write_series(tmp_path / "part", z[:5] + z[8:])  # three slices missing after z = 20
    (warning,) = read_study(tmp_path / "part").warnings.itertuples(index=False)
    assert warning.path == paths[5].name
    assert "no slice between z = 20.0 and 40.0 mm (about 3 missing at its 5.00 mm spacing)" in warning.warning
