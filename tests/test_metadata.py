"""The header-only metadata pass: one row per image, z order within series, resume, bad files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import competition.metadata as metadata_module
from competition.badfiles import read_bad_files
from competition.layout import Layout, LayoutError
from competition.metadata import COLUMNS, build_metadata
from dicom_factory import write_ct


@pytest.fixture()
def dataset(tmp_path):
    """Two patients, three series, z in no file-name order, one tie in z, one file that is not DICOM."""
    rng = np.random.default_rng(0)
    root = tmp_path / "comp"
    truth = []
    series = [("ID_0000000a", "ID_000000000a", "ID_00000000s1", "train", [30.0, 10.0, 20.0, 0.0]),
              ("ID_0000000a", "ID_000000000b", "ID_00000000s2", "train", [5.0, 5.0, -5.0]),
              ("ID_0000000b", "ID_000000000c", "ID_00000000s3", "test", [1.5, 0.0, 3.0])]
    for patient, study, ser, split, zs in series:
        for z in zs:
            image_id = f"ID_{rng.integers(0, 16**9):09x}"
            write_ct(root / f"stage_2_{split}" / f"{image_id}.dcm", np.zeros((8, 8), np.uint16),
                     patient=patient, study=study, series=ser, z=z)
            truth.append((image_id, split, patient, study, ser, z))
    (root / "stage_2_train" / "ID_badbadbad.dcm").write_bytes(b"garbage")
    return root, pd.DataFrame(truth, columns=["image_id", "split", "patient_id", "study_id", "series_id", "z"])


def test_one_row_per_image_with_z_order(dataset, tmp_path):
    root, truth = dataset
    table = build_metadata(root, tmp_path / "work" / "metadata.parquet", workers=1, progress=False,
                           bad_files_csv=tmp_path / "work" / "bad_files.csv")
    assert list(table.columns) == COLUMNS
    assert sorted(table["image_id"]) == sorted(truth["image_id"])
    merged = table.merge(truth, on="image_id", suffixes=("", "_true"))
    for col in ("split", "patient_id", "study_id", "series_id", "z"):
        assert (merged[col] == merged[f"{col}_true"]).all(), col
    # Brute force: within each series, slice_index is the rank by (z, image_id).
    for _, group in merged.groupby("series_id"):
        expected = sorted(group.itertuples(), key=lambda r: (r.z, r.image_id))
        assert [r.slice_index for r in expected] == list(range(len(group)))
        assert (group["n_slices"] == len(group)).all()
    assert (table["path"] == table["split"].map({"train": "stage_2_train/", "test": "stage_2_test/"}) + table["image_id"] + ".dcm").all()
    bad = read_bad_files(tmp_path / "work" / "bad_files.csv")
    assert bad["image_id"].tolist() == ["ID_badbadbad"] and bad["stage"].tolist() == ["metadata"]


def test_second_run_reads_nothing_and_new_files_only(dataset, tmp_path, monkeypatch):
    root, truth = dataset
    out = tmp_path / "metadata.parquet"
    first = build_metadata(root, out, workers=1, progress=False)
    read = []
    real_read = metadata_module.read_headers
    monkeypatch.setattr(metadata_module, "read_headers", lambda r, paths: (read.extend(paths), real_read(r, paths))[1])
    (root / "stage_2_train" / "ID_badbadbad.dcm").unlink()
    pd.testing.assert_frame_equal(build_metadata(root, out, workers=1, progress=False), first)
    assert read == []
    write_ct(root / "stage_2_test" / "ID_00000new1.dcm", np.zeros((8, 8), np.uint16), series="ID_00000000s3", z=99.0)
    table = build_metadata(root, out, workers=1, progress=False)
    assert read == ["stage_2_test/ID_00000new1.dcm"]
    assert len(table) == len(first) + 1
    assert table.set_index("image_id").loc["ID_00000new1", "slice_index"] == 3


def test_resumes_from_finished_chunks(dataset, tmp_path, monkeypatch):
    root, truth = dataset
    out = tmp_path / "metadata.parquet"
    monkeypatch.setattr(metadata_module, "CHUNK", 3)
    calls = []
    real_read = metadata_module.read_headers

    def crash_on_third(r, paths):
        calls.append(list(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-pass
        return real_read(r, paths)

    monkeypatch.setattr(metadata_module, "read_headers", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_metadata(root, out, workers=1, progress=False)
    assert not out.exists()
    done_before = {p for c in calls[:2] for p in c}
    calls.clear()
    monkeypatch.setattr(metadata_module, "read_headers", lambda r, paths: (calls.append(list(paths)), real_read(r, paths))[1])
    table = build_metadata(root, out, workers=1, progress=False)
    assert not {p for c in calls for p in c} & done_before
    assert len(table) == len(truth)


def test_parallel_equals_serial(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    monkeypatch.setattr(metadata_module, "CHUNK", 4)
    serial = build_metadata(root, tmp_path / "a.parquet", workers=1, progress=False)
    parallel = build_metadata(root, tmp_path / "b.parquet", workers=2, progress=False)
    pd.testing.assert_frame_equal(serial, parallel)


def test_layout_errors(tmp_path):
    with pytest.raises(LayoutError, match="does not exist.*make data"):
        Layout.find(tmp_path / "absent")
    with pytest.raises(LayoutError, match="no stage_2_train"):
        Layout.find(tmp_path)
    (tmp_path / "stage_1_train_images").mkdir()
    (tmp_path / "stage_1_train").mkdir()
    layout = Layout.find(tmp_path)
    assert layout.stage == "stage_1" and layout.train_csv.name == "stage_1_train.csv"
    with pytest.raises(LayoutError, match="missing train_csv"):
        layout.require("train_csv")


def test_real_sample_series_order(real_sample, tmp_path):
    table = build_metadata(real_sample, tmp_path / "metadata.parquet", workers=2, progress=False)
    assert len(table) == 32 and (table["split"] == "test").all()
    assert table["series_id"].nunique() == 1 and (table["n_slices"] == 32).all()
    ordered = table.sort_values("slice_index")
    assert ordered["slice_index"].tolist() == list(range(32))
    assert ordered["z"].is_monotonic_increasing
    assert ordered["z"].iloc[0] == pytest.approx(155.0, abs=0.1) and ordered["z"].iloc[-1] == pytest.approx(313.1, abs=0.1)
    # File names are in no z order in the real data.
    assert table["slice_index"].tolist() != list(range(32))


def write_series(root, series, slices, rng):
    """Slices given as (z or None, instance number or None); returns their ids in that order."""
    ids = []
    for z, instance in slices:
        image_id = f"ID_{rng.integers(0, 16**9):09x}"  # random: file names in no slice order
        write_ct(root / "stage_2_train" / f"{image_id}.dcm", np.zeros((4, 4), np.uint16), series=series,
                 z=z, instance_number=instance)
        ids.append(image_id)
    return ids


def test_slices_without_position_are_ordered_by_instance_number(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "comp"
    # Listed in true slice order (z rising). Instance numbers rise with z here...
    some_missing = write_series(root, "ID_0000000sa", [(0.0, 1), (5.0, 2), (None, 3), (15.0, 4), (None, 5)], rng)
    # ... and fall as z rises here (scanned head to feet): the order must still follow z.
    falling = write_series(root, "ID_0000000sb", [(None, 9), (2.5, 8), (5.0, 7), (None, 6), (10.0, 5)], rng)
    all_missing = write_series(root, "ID_0000000sc", [(None, 1), (None, 2), (None, 10), (None, 11)], rng)
    neither = write_series(root, "ID_0000000sd", [(None, None), (None, None), (1.0, None)], rng)
    complete = write_series(root, "ID_0000000se", [(-3.0, 7), (1.0, 1), (2.0, 4)], rng)  # z wins over instance
    table = build_metadata(root, tmp_path / "metadata.parquet", workers=1, progress=False).set_index("image_id")
    for ids in (some_missing, falling, all_missing, complete):
        assert table.loc[ids, "slice_index"].tolist() == list(range(len(ids)))
        assert (table.loc[ids, "n_slices"] == len(ids)).all()
    assert table.loc[neither].sort_values("slice_index").index.tolist() == sorted(neither)  # file-name order
    # z is not invented where the header has none; InstanceNumber is kept.
    assert table.loc[some_missing, "z"].isna().tolist() == [False, False, True, False, True]
    assert table.loc[falling, "instance_number"].tolist() == [9, 8, 7, 6, 5]


def test_a_table_from_an_older_version_is_read_again(dataset, tmp_path, capsys):
    root, truth = dataset
    out = tmp_path / "metadata.parquet"
    fresh = build_metadata(root, out, workers=1, progress=False)
    fresh.drop(columns="instance_number").to_parquet(out)  # as written before instance_number existed
    again = build_metadata(root, out, workers=1, progress=False)
    assert "lacks ['instance_number']" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, fresh)
