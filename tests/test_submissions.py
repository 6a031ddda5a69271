"""Submission files: written in the sample's ids and order, clipped; the validator refuses each kind of
bad file naming its first bad row; `submit` runs the exact kaggle command without the network."""
from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import competition.kaggle_cli as kaggle_cli
from competition.constants import COMPETITION, LABELS
from competition.paths import WorkPaths
from submissions.__main__ import main as submissions_main
from submissions.kaggle_submit import submit
from submissions.validate import SubmissionError, validate_submission
from submissions.write import STACK_SOURCE, submission_path, to_long, write_from_work, write_submission

IMAGES = [f"ID_{i:09x}" for i in range(7)]


def make_data(root: Path) -> Path:
    """A competition folder with just what submissions need: the test folder and the sample."""
    (root / "stage_2_test").mkdir(parents=True)
    # The sample lists images in a scrambled order, subtypes in the Kaggle file's order.
    ids = [f"{img}_{sub}" for img in np.random.default_rng(1).permutation(IMAGES) for sub in
           ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")]
    pd.DataFrame({"ID": ids, "Label": 0.5}).to_csv(root / "stage_2_sample_submission.csv", index=False)
    return root


def predictions(seed: int = 0) -> pd.DataFrame:
    p = np.random.default_rng(seed).random((len(IMAGES), len(LABELS)))
    p[0, 0], p[1, 5] = 0.0, 1.0  # to be clipped
    return pd.DataFrame(p, columns=list(LABELS)).assign(image_id=IMAGES)[["image_id", *LABELS]]


def test_written_file_has_the_sample_ids_and_the_predictions(tmp_path: Path) -> None:
    data = make_data(tmp_path / "rsna")
    preds = predictions()
    out = write_submission(preds.iloc[::-1], data / "stage_2_sample_submission.csv", tmp_path / "sub.csv.gz", clip=1e-4)
    with gzip.open(out, "rt") as fh:  # really gzip
        assert fh.readline().strip() == "ID,Label"
    written = pd.read_csv(out)
    sample = pd.read_csv(data / "stage_2_sample_submission.csv")
    assert written["ID"].tolist() == sample["ID"].tolist()
    # Independent lookup: loop over rows, split the id by hand.
    lookup = preds.set_index("image_id")
    for id_, label in zip(written["ID"], written["Label"]):
        image, subtype = id_.rsplit("_", 1)
        assert label == pytest.approx(float(np.clip(lookup.loc[image, subtype], 1e-4, 1 - 1e-4)), rel=1e-5)
    assert written["Label"].min() == pytest.approx(1e-4) and written["Label"].max() == pytest.approx(1 - 1e-4)
    assert not list(tmp_path.glob(".part-*"))


def test_predictions_with_missing_or_extra_images_are_refused(tmp_path: Path) -> None:
    sample_ids = pd.Index(pd.read_csv(make_data(tmp_path / "rsna") / "stage_2_sample_submission.csv")["ID"])
    with pytest.raises(SubmissionError, match="lack 1 image"):
        to_long(predictions().iloc[1:], sample_ids)
    extra = pd.concat([predictions(), predictions().iloc[:1].assign(image_id="ID_ffffffff0")])
    with pytest.raises(SubmissionError, match="not in the sample submission"):
        to_long(extra, sample_ids)
    nan = predictions()
    nan.loc[2, "subdural"] = np.nan
    with pytest.raises(SubmissionError, match=f"NaN for {IMAGES[2]}_subdural"):
        to_long(nan, sample_ids)


@pytest.fixture()
def good_file(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    data = make_data(tmp_path / "rsna")
    sample = data / "stage_2_sample_submission.csv"
    table = to_long(predictions(), pd.Index(pd.read_csv(sample)["ID"]))
    return data, sample, table


def _write(table: pd.DataFrame, path: Path) -> Path:
    table.to_csv(path, index=False)
    return path


def test_validator_accepts_the_good_file(good_file, tmp_path: Path) -> None:
    _, sample, table = good_file
    assert validate_submission(_write(table, tmp_path / "ok.csv"), sample) == len(IMAGES) * 6
    assert validate_submission(_write(table.iloc[::-1], tmp_path / "ok.csv.gz"), sample) == len(IMAGES) * 6  # any order


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t.drop(index=10), r"1 id\(s\) of the sample submission missing, first ID_\w+"),
        (lambda t: pd.concat([t, pd.DataFrame({"ID": ["ID_0123456789_any"], "Label": [0.5]})], ignore_index=True),
         r"line 44 \(ID_0123456789_any, Label '0.5'\): ID is not in the sample submission"),
        (lambda t: pd.concat([t.iloc[:5], t.iloc[[3]], t.iloc[5:]], ignore_index=True), r"line 7 .*ID appears twice"),
        (lambda t: t.assign(Label=t["Label"].where(t.index != 8, np.nan)), r"line 10 .*Label is NaN or empty"),
        (lambda t: t.assign(Label=t["Label"].where(t.index != 4, 1.5)), r"line 6 .*Label '1.5'.*outside \[0, 1\]"),
        (lambda t: t.assign(Label=t["Label"].where(t.index != 3, -0.01)), r"line 5 .*outside \[0, 1\]"),
        (lambda t: t.astype({"Label": object}).assign(Label=lambda d: d["Label"].where(d.index != 2, "abc")),
         r"line 4 .*not a number"),
        (lambda t: t.rename(columns={"Label": "label"}), r"header is ID,label"),
    ],
    ids=["missing", "extra", "duplicate", "nan", "above_one", "negative", "text", "header"],
)
def test_validator_refuses_each_kind_of_bad_file(good_file, tmp_path: Path, corrupt, message) -> None:
    _, sample, table = good_file
    path = _write(corrupt(table.copy()), tmp_path / "bad.csv.gz")
    with pytest.raises(SubmissionError, match=message):
        validate_submission(path, sample)


def test_first_bad_row_is_named_when_there_are_several(good_file, tmp_path: Path) -> None:
    _, sample, table = good_file
    bad = table.copy()
    bad.loc[[30, 12], "Label"] = [2.0, np.nan]
    with pytest.raises(SubmissionError, match=r"line 14 .*NaN.*\[2 bad row\(s\) in all\]"):
        validate_submission(_write(bad, tmp_path / "bad.csv"), sample)


def test_cli_writes_model_and_stack_submissions(tmp_path: Path, capsys) -> None:
    data = make_data(tmp_path / "rsna")
    paths = WorkPaths.for_data(data, tmp_path / "work")
    for folder, seed in ((paths.model_dir("cnn_a"), 1), (paths.stack, 2)):
        folder.mkdir(parents=True)
        predictions(seed).to_parquet(folder / "test.parquet", index=False)
    out_dir = tmp_path / "subs"
    args = ["write", "--data", str(data), "--work", str(paths.root), "--out-dir", str(out_dir)]
    assert submissions_main([*args, "--model", "cnn_a"]) == 0
    assert capsys.readouterr().out.strip() == str(out_dir / "rsna-cnn_a.csv.gz")
    assert submissions_main([*args, "--stack"]) == 0
    assert capsys.readouterr().out.strip() == str(submission_path(data, STACK_SOURCE, out_dir))
    assert (out_dir / "rsna-stack.csv.gz").is_file()
    assert submissions_main(["validate", str(out_dir / "rsna-stack.csv.gz"), "--data", str(data)]) == 0
    with pytest.raises(SubmissionError, match=r"make oof MODEL=nope"):
        write_from_work(data, paths.root, "nope", out_dir)


@pytest.fixture()
def recorded_run(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake_run(cmd, check=False, **kwargs):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(kaggle_cli.subprocess, "run", fake_run)
    return calls


def test_submit_runs_the_exact_kaggle_command(good_file, tmp_path: Path, monkeypatch, recorded_run) -> None:
    data, _, table = good_file
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    path = _write(table, tmp_path / "rsna-stack.csv.gz")
    submit(path, "stack v1 (5 folds)", data)
    assert len(recorded_run) == 1
    assert recorded_run[0][1:] == ["competitions", "submit", "-c", COMPETITION, "-f", str(path), "-m", "stack v1 (5 folds)"]
    assert Path(recorded_run[0][0]).name == "kaggle"
    assert COMPETITION == "rsna-intracranial-hemorrhage-detection"


def test_submit_without_credentials_is_a_clear_error(good_file, tmp_path: Path, monkeypatch, recorded_run, capsys) -> None:
    _, _, table = good_file
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = _write(table, tmp_path / "rsna-stack.csv.gz")
    with pytest.raises(kaggle_cli.KaggleCredentialsError, match="kaggle.json"):
        submit(path, "msg")
    assert recorded_run == []
    from submissions.__main__ import run_main  # the CLI's one-line error, exit 2
    assert run_main(submissions_main, ["submit", "--file", str(path), "--message", "m"], prog="x") == 2
    assert "error: no Kaggle credentials found" in capsys.readouterr().err


def test_submit_refuses_an_invalid_file_before_calling_kaggle(good_file, tmp_path: Path, monkeypatch, recorded_run) -> None:
    data, _, table = good_file
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    path = _write(table.iloc[1:], tmp_path / "short.csv")
    with pytest.raises(SubmissionError, match="missing"):
        submit(path, "msg", data)
    assert recorded_run == []
