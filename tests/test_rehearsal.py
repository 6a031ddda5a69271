"""The rehearsal (issue 21): its competition holds what it claims, checked from the written CSVs and
DICOM headers alone, and its runner prints one line per stage, keeps rehearsal.json and resumes."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from competition.dicom import read_hu

# The claim (rehearsal.shape's docstring), written out again here: the real stage 2 counts.
REAL_TRAIN, REAL_TEST = 752_803, 121_232
REAL_POSITIVES = {"epidural": 3_145, "intraparenchymal": 36_118, "intraventricular": 26_205,
                  "subarachnoid": 35_675, "subdural": 47_166, "any": 107_933}
SCALE = 0.002
LINE = re.compile(r"^rehearsal (\w+): (\d+\.\d) s, peak (\d+) MiB, (\d+) rows, (-?\d+\.\d) MiB written")


def _wide(csv: Path) -> pd.DataFrame:
    long = pd.read_csv(csv)
    parts = long["ID"].str.rsplit("_", n=1, expand=True)
    return long.assign(image_id=parts[0], label=parts[1]).pivot(index="image_id", columns="label", values="Label")


@pytest.fixture(scope="module")
def competition(tmp_path_factory) -> Path:
    from rehearsal.generate import generate

    out = tmp_path_factory.mktemp("reh") / "data"
    generate(out, SCALE, workers=1, heads=2)
    return out


def test_counts_and_label_shares_match_the_real_competition(competition: Path) -> None:
    train = _wide(competition / "stage_2_train.csv")
    answers = _wide(competition / "stage_2_test_answers.csv")
    sample = _wide(competition / "stage_2_sample_submission.csv")
    assert len(train) == round(REAL_TRAIN * SCALE) and len(answers) == round(REAL_TEST * SCALE)
    assert set(sample.index) == set(answers.index) and (sample.to_numpy() == 0.5).all()
    for table in (train, answers):
        for label, positives in REAL_POSITIVES.items():
            assert table[label].sum() == round(positives / REAL_TRAIN * len(table)), label
        subtypes = table.drop(columns="any")
        assert (table["any"] == subtypes.max(axis=1)).all()


def test_dicom_headers_give_real_series_lengths_and_one_bleed_run(competition: Path) -> None:
    rows = []
    for split in ("train", "test"):
        for f in (competition / f"stage_2_{split}").iterdir():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert f.stem == ds.SOPInstanceUID
            rows.append((ds.SOPInstanceUID, split, ds.PatientID, ds.SeriesInstanceUID,
                         float(ds.ImagePositionPatient[2])))
    headers = pd.DataFrame(rows, columns=["image_id", "split", "patient", "series", "z"]).set_index("image_id")
    labels = pd.concat([_wide(competition / "stage_2_train.csv"), _wide(competition / "stage_2_test_answers.csv")])
    assert set(headers.index) == set(labels.index)
    lengths = headers.groupby("series").size()
    assert lengths.between(24, 60).all() and 28 <= lengths.median() <= 36
    assert headers.groupby("patient")["split"].nunique().max() == 1  # no patient on both sides
    joined = headers.join(labels).sort_values(["series", "z"])
    for _, series in joined.groupby("series"):
        positive = np.flatnonzero(series["any"].to_numpy())
        if len(positive):  # one contiguous run of `any` per series
            assert positive[-1] - positive[0] + 1 == len(positive)
    bleeding = joined.index[joined["any"] == 1][0]
    split = headers.loc[bleeding, "split"]
    assert read_hu(competition / f"stage_2_{split}" / f"{bleeding}.dcm").shape == (64, 64)


def _stub_stages(reh, calls: Path, fail: str = ""):
    from rehearsal.run import Stage

    def command(name: str) -> list[list[str]]:
        code = f"open({str(calls)!r}, 'a').write({name!r} + '\\n'); bytearray(30 * 2**20)"
        if name == fail:
            code += "; raise SystemExit(3)"
        return [[sys.executable, "-c", code]]

    return [Stage(name, command(name), lambda: 7) for name in ("alpha", "beta", "gamma")]


def test_runner_prints_a_line_per_stage_writes_json_and_resumes(tmp_path, monkeypatch, capsys) -> None:
    from rehearsal import run as run_module

    calls = tmp_path / "calls.txt"
    monkeypatch.setattr(run_module, "baseline", lambda root: {"seconds": 0.01, "peak_mib": 10.0})  # no torch import
    monkeypatch.setattr(run_module.Rehearsal, "stages", lambda self: _stub_stages(self, calls, fail="beta"))
    with pytest.raises(SystemExit, match="stage 'beta' failed"):
        run_module.run(tmp_path / "r", 0.5, workers=1, limit=10, stack_opts=[])
    monkeypatch.setattr(run_module.Rehearsal, "stages", lambda self: _stub_stages(self, calls))
    summary = run_module.run(tmp_path / "r", 0.5, workers=1, limit=10, stack_opts=[])
    assert calls.read_text().split() == ["alpha", "beta", "beta", "gamma"]  # alpha kept, not rerun
    printed = [m for m in map(LINE.match, capsys.readouterr().out.splitlines()) if m]
    assert [m.group(1) for m in printed] == ["alpha", "alpha", "beta", "gamma"]
    saved = json.loads((tmp_path / "r" / "rehearsal.json").read_text())
    assert saved["lines"] == summary["lines"] and [LINE.match(x).group(1) for x in saved["lines"]] == ["alpha", "beta", "gamma"]
    for r in saved["stages"].values():
        assert r["rows"] == 7 and r["peak_mib"] >= 30  # the child's 30 MiB buffer is in its stage's peak
        start = min(r["seconds"], saved["baseline"]["seconds"])
        assert r["seconds_scale_1"] == pytest.approx(start + (r["seconds"] - start) / 0.5)


@pytest.mark.slow
def test_every_real_stage_runs_at_a_small_scale(tmp_path, capsys) -> None:
    """`make rehearsal SCALE=0.002` with a short level 2 (minutes on 2 cores)."""
    from rehearsal.run import run

    run(tmp_path / "r", SCALE, workers=2, limit=200, stack_opts="--rounds 20 --seq-epochs 1 --embedding-dim 8".split())
    names = [m.group(1) for m in map(LINE.match, capsys.readouterr().out.splitlines()) if m]
    expected = ["generate", "metadata", "labels", "folds", "cache", "level1_fabricated", "level1_cnn", "level2",
                "submission", "predict", "report"]
    assert names == expected
    saved = json.loads((tmp_path / "r" / "rehearsal.json").read_text())
    assert list(saved["stages"]) == expected
    assert saved["stages"]["metadata"]["rows"] == round(REAL_TRAIN * SCALE) + round(REAL_TEST * SCALE)
    assert saved["stages"]["submission"]["rows"] == 6 * round(REAL_TEST * SCALE)


def test_level2_time_is_scaled_to_the_product_defaults(tmp_path) -> None:
    """The rehearsal runs level 2 short (rehearsal.run.STACK_OPTS); its summary gives LightGBM's
    seconds per 100 rounds and scales the sequence model's seconds to make stack's default epochs."""
    from level2_stacking.sequence import SequenceSettings
    from rehearsal.run import STACK_OPTS, level2_defaults

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"lgbm_seconds": 120.0, "sequence_seconds": 30.0}))
    epochs = SequenceSettings.epochs
    pair = level2_defaults(metrics, "--rounds 40 --seq-epochs 3".split())  # early stopping on: two trainings
    once = level2_defaults(metrics, "--rounds 40 --early-stopping 0 --seq-epochs 3".split())
    assert pair["lgbm_seconds_per_100_rounds"] == pytest.approx(120.0 / 2 * 100 / 40)
    assert once["lgbm_seconds_per_100_rounds"] == pytest.approx(120.0 * 100 / 40)
    assert once["sequence_seconds_at_default_epochs"] == pytest.approx(30.0 * epochs / 3)
    assert "--early-stopping 0" in STACK_OPTS and level2_defaults(tmp_path / "absent.json", []) == {}
