"""The competitor's loop through the installed `kaggle` command, against a stand-in of the Kaggle API on
127.0.0.1 (tests/kaggle_standin.py): download (cut, resumed by the client), prepare, submit -> log row ->
score arrives -> printed; a repeat refused, FORCE allowed; no credentials is one line; the leaderboard
table and the CV-vs-LB figure. Plus progress lines, not carriage-return frames, in a log file."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from competition.constants import COMPETITION
from competition.paths import WorkPaths
from dicom_factory import write_mini_competition
from kaggle_standin import Standin, StandinState
from competition.__main__ import main as competition_main
from competition.cli import run_main
from reports.leaderboard import correlation, leaderboard_section, plot_cv_vs_lb
from reports.leaderboard import main as leaderboard_main
from submissions.__main__ import main as submissions_main
from submissions.log import COLUMNS, LOG_VERSION, read_log, write_log
from submissions.write import write_from_work
from test_submissions import make_data, predictions

REPO = Path(__file__).resolve().parents[1]
USER, KEY = "standin-user", "standin-key"


def cli(main, args: list[str], capfd) -> tuple[int, str, str]:
    """A command's main as its `make` recipe runs it (one-line errors, exit 2), in this process; the
    `kaggle` client it calls is a real subprocess, so its output is captured at the descriptors."""
    code = run_main(main, [str(a) for a in args], prog="cli")
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture()
def standin(monkeypatch, tmp_path: Path):
    """The stand-in, and this process's environment pointing the kaggle client at it."""
    state = StandinState(COMPETITION, USER, KEY)
    for var in [v for v in os.environ if v.startswith("KAGGLE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no kaggle.json of the machine's user
    monkeypatch.setenv("TQDM_MININTERVAL", "15")  # what kaggle_cli sets off a terminal; undone after the test
    with Standin(state) as server:
        for var, value in server.env.items():
            monkeypatch.setenv(var, value)
        yield server


def zip_folder(folder: Path, padding: bytes) -> bytes:
    """The competition as Kaggle serves it, plus incompressible padding so the archive spans chunks."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            z.write(f, f.relative_to(folder).as_posix())
        z.writestr("padding.bin", padding)
    return buf.getvalue()


def test_download_is_cut_resumed_and_unzipped_byte_for_byte_then_prepared(standin, tmp_path: Path, capfd) -> None:
    source = write_mini_competition(tmp_path / "served")
    archive = zip_folder(source, np.random.default_rng(0).bytes(3 << 20))
    standin.state.archive, standin.state.cut_after = archive, (3 << 20) // 2
    standin.state.files = {"stage_2_train.csv": (source / "stage_2_train.csv").stat().st_size}

    listed = subprocess.run([str(REPO / ".venv/bin/kaggle"), "competitions", "files", "-c", COMPETITION],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "stage_2_train.csv" in listed.stdout

    data = tmp_path / "rsna"
    code, _, err = cli(competition_main, ["download", "--data", data], capfd)
    assert code == 0, err
    ranges = [r for r in standin.state.requests if r.startswith("GET") and "bytes=" in r]
    assert ranges and int(ranges[0].split("bytes=")[1].split("-")[0]) > 0  # resumed mid-file, not restarted
    assert (data / f"{COMPETITION}.zip").read_bytes() == archive
    for f in (p for p in source.rglob("*") if p.is_file()):
        assert (data / f.relative_to(source)).read_bytes() == f.read_bytes(), f

    code, _, err = cli(competition_main, ["prepare", "--data", data, "--work", tmp_path / "work", "--workers", "1",
                                          "--n-folds", "2"], capfd)
    assert code == 0, err
    labels = pd.read_parquet(tmp_path / "work" / "labels.parquet")
    assert len(labels) == pd.read_csv(source / "stage_2_train.csv")["ID"].str.rsplit("_", n=1).str[0].nunique()


@pytest.fixture()
def stacked(tmp_path: Path):
    """DATA with a sample submission, a work folder with a stack (test predictions, metrics, settings),
    and the stack's submission written by `make stack`'s writer (which records where it came from)."""
    data = make_data(tmp_path / "rsna")
    paths = WorkPaths.for_data(data, tmp_path / "work")
    paths.stack.mkdir(parents=True)
    predictions(2).to_parquet(paths.stack / "test.parquet", index=False)
    (paths.stack / "metrics.json").write_text(json.dumps({
        "models": ["cnn_a", "cnn_b"], "stacker": "blend", "params_source": "tuned",
        "any_rule": {"applied": True}, "oof_weighted_log_loss": 0.06125}))
    (paths.stack / ".inputs.json").write_text(json.dumps({"files": {}, "options": {"stacker": "blend", "k_neighbours": 5}}))
    file = write_from_work(data, paths.root, None, tmp_path / "subs")
    return data, paths, file


def submit(stacked, capfd, *extra: str) -> tuple[int, str, str]:
    data, paths, file = stacked
    return cli(submissions_main, ["submit", "--file", file, "--message", "blend v1", "--data", data,
                                  "--work", paths.root, "--poll", "0.2", *extra], capfd)


def test_submit_logs_waits_for_the_score_refuses_a_repeat_and_the_leaderboard_fills_in(standin, stacked, capfd) -> None:
    data, paths, file = stacked
    code, out, err = submit(stacked, capfd, "--wait", "30")
    assert code == 0, err
    served = standin.state.submissions[-1]
    assert served["content"] == file.read_bytes() and served["description"] == "blend v1"
    assert f"public {served['public']}  private {served['private']}" in out
    assert "OOF weighted log loss 0.06125 (stack)" in out
    assert sum(r == "POST ListSubmissions" for r in standin.state.requests) == 2  # pending, then complete

    log = read_log(file.parent / "log.csv")
    assert len(log) == 1
    row = log.iloc[0]
    assert row["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (row["source"], row["models"], row["ref"], row["status"]) == ("stack", "cnn_a cnn_b", str(served["ref"]), "complete")
    assert json.loads(row["level2"]) == {"stacker": "blend", "k_neighbours": 5, "params_source": "tuned", "any_rule": True}
    assert float(row["oof_weighted_log_loss"]) == 0.06125 and row["log_version"] == str(LOG_VERSION)
    assert (float(row["public_score"]), float(row["private_score"])) == (served["public"], served["private"])
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert row["git_commit"] and head.startswith(row["git_commit"].removesuffix("+dirty"))

    code, out, err = submit(stacked, capfd, "--wait", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "already submitted" in err and "FORCE=1" in err
    assert len(standin.state.submissions) == 1 and len(read_log(file.parent / "log.csv")) == 1

    code, out, err = submit(stacked, capfd, "--wait", "0", "--force")
    assert code == 0, err
    assert "not scored yet" in out and "make leaderboard" in out
    assert len(standin.state.submissions) == 2
    assert list(read_log(file.parent / "log.csv")["status"]) == ["complete", "pending"]

    # `make leaderboard`, later: the pending row is filled in, the table printed, the figure drawn.
    standin.state.pending_polls = 0
    log_path = file.parent / "log.csv"
    code, out, err = cli(submissions_main, ["leaderboard", "--log", log_path], capfd)
    assert code == 0, err
    header, *lines = out.strip().splitlines()
    assert header.split()[:4] == ["time", "file", "source", "OOF"] and len(lines) == 2
    for line, served in zip(lines, standin.state.submissions):
        assert file.name in line and "0.06125" in line and f"{served['public']} " in line and f"{served['private']} " in line
    assert read_log(log_path)["status"].tolist() == ["complete", "complete"]

    code, out, err = cli(leaderboard_main, ["--log", log_path], capfd)
    assert code == 0 and "r public n/a" in out, err  # two points: no correlation claimed
    assert (log_path.parent / "cv_vs_lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = leaderboard_section(log_path)
    assert "data:image/png;base64," in section and "blend v1" in section


def test_no_credentials_is_one_line_and_nothing_is_sent(standin, stacked, monkeypatch, capfd) -> None:
    _, _, file = stacked
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    code, _, err = submit(stacked, capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no Kaggle credentials found" in err and not (file.parent / "log.csv").exists()
    pending = {c: "x" for c in COLUMNS} | {"status": "pending", "message": "old one"}
    write_log(file.parent / "log.csv", pd.DataFrame([pending]))
    code, out, _ = cli(submissions_main, ["leaderboard", "--log", file.parent / "log.csv"], capfd)
    assert code == 0 and out.startswith("pending scores not refreshed: no Kaggle credentials found") and "old one" in out
    assert standin.state.requests == []


def test_cv_vs_lb_correlation_matches_numpy_and_scipy(tmp_path: Path) -> None:
    from scipy.stats import pearsonr

    rng = np.random.default_rng(3)
    oof = rng.uniform(0.05, 0.09, 6)
    public, private = oof + rng.normal(0, 0.005, 6), oof + rng.normal(0, 0.01, 6)
    log = pd.DataFrame({c: [""] * 7 for c in COLUMNS})
    log["oof_weighted_log_loss"] = [*map(str, oof), ""]  # the last one has no OOF score: left out
    log["public_score"], log["private_score"] = [*map(str, public), "0.1"], [*map(str, private), "0.1"]
    log["source"] = [f"s{i}" for i in range(7)]
    write_log(tmp_path / "log.csv", log)
    found = plot_cv_vs_lb(read_log(tmp_path / "log.csv"), tmp_path / "cv.png")
    assert found["public"] == pytest.approx(pearsonr(oof, public)[0])
    assert found["private"] == pytest.approx(pearsonr(oof, private)[0])
    assert np.isnan(correlation(oof[:2], public[:2]))  # two points: undefined, not a fake 1.0
    assert (tmp_path / "cv.png").stat().st_size > 0


def test_progress_in_a_log_file_is_lines_not_carriage_return_frames(tmp_path: Path) -> None:
    script = ("import time, competition.progress as p\n"
              "p.LOG_INTERVAL_S = 0.05\n"
              "for _ in p.progress_bar(range(20), desc='work', unit='item'):\n"
              "    time.sleep(0.01)\n")
    log = tmp_path / "run.log"
    with open(log, "w") as out:  # a file, as `make demo > log` gives
        subprocess.run([sys.executable, "-c", script], cwd=REPO, stdout=out, stderr=out, check=True, timeout=60)
    text = log.read_text()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert all(line.startswith("work:") for line in lines) and 2 <= len(lines) <= 20
    assert "20/20" in lines[-1] and "20/20" not in lines[-2]  # the final frame once, not redrawn at close


def test_report_embeds_the_submissions_log_and_the_cv_vs_lb_figure(tmp_path: Path, capfd) -> None:
    from competition.constants import LABELS
    from reports.html_report import main as report_main

    data, work = tmp_path / "comp", tmp_path / "work"
    (data / "stage_2_train").mkdir(parents=True)
    work.mkdir()
    pd.DataFrame({"image_id": ["ID_000000001"], **{lb: [0] for lb in LABELS}}).to_parquet(work / "labels.parquet")
    pd.DataFrame({"image_id": ["ID_000000001"], "split": ["train"], "study_id": ["s"]}).to_parquet(work / "metadata.parquet")
    log = pd.DataFrame({c: ["x"] for c in COLUMNS}).assign(oof_weighted_log_loss="0.061", public_score="0.071",
                                                           private_score="0.052", message="blend <v2>")
    write_log(tmp_path / "subs" / "log.csv", log)
    args = ["--data", data, "--work", work, "--submissions-log", tmp_path / "subs" / "log.csv"]
    code, out, err = cli(report_main, args, capfd)
    assert code == 0, err
    page = Path(out.strip()).read_text()
    assert page.count('id="leaderboard"') == 1 and "blend &lt;v2&gt;" in page and "make leaderboard" in page
    code, out, _ = cli(leaderboard_main, ["--log", tmp_path / "subs" / "log.csv"], capfd)
    code, out, err = cli(report_main, args, capfd)  # the new figure is an input: the page is rebuilt with it
    page = Path(out.strip()).read_text()
    assert code == 0 and "data:image/png;base64," in page.split('id="leaderboard"')[1]


def test_the_kaggle_client_redraws_its_bars_rarely_off_a_terminal(monkeypatch) -> None:
    from competition.kaggle_cli import kaggle_command

    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    monkeypatch.delenv("TQDM_MININTERVAL")  # restored (absent) after the test
    assert not sys.stderr.isatty()  # pytest captures it
    assert kaggle_command(["competitions", "files"])[1:] == ["competitions", "files"]
    assert os.environ["TQDM_MININTERVAL"] == "15"  # tqdm reads TQDM_* as its defaults, in the client too


def test_a_model_submission_records_its_oof_and_an_edited_file_is_unknown(tmp_path: Path) -> None:
    from submissions.provenance import facts_for, file_sha256

    data = make_data(tmp_path / "rsna")
    paths = WorkPaths.for_data(data, tmp_path / "work")
    paths.model_dir("cnn_a").mkdir(parents=True)
    predictions(1).to_parquet(paths.model_dir("cnn_a") / "test.parquet", index=False)
    (paths.model_dir("cnn_a") / "metrics.json").write_text(json.dumps({"pooled": {"weighted_log_loss": 0.0712}}))
    file = write_from_work(data, paths.root, "cnn_a", tmp_path / "subs")
    facts = facts_for(paths, file_sha256(file))
    assert facts == {"source": "cnn_a", "models": "cnn_a", "level2": "", "oof_weighted_log_loss": 0.0712}
    file.write_bytes(file.read_bytes() + b"\n")  # edited after writing: no longer that model's output
    assert facts_for(paths, file_sha256(file))["source"] == "unknown"
