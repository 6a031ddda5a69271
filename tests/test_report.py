"""Per-run plots (threshold tables against brute force and sklearn) and the self-contained HTML report
(well-formed, every image embedded and decodable, every model's scores as computed independently)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, log_loss, recall_score, roc_auc_score

from competition.cli import run_main
from competition.constants import LABEL_WEIGHTS, LABELS
from level1_models.curves import COLUMNS, plot_curves
from reports.html_report import MEAN_NAME, STACK_NAME, build_report, main as report_main
from reports.plots import (
    CONFUSION_FILE, MAX_PLOT_POINTS, OPERATING_POINT_FILE, PLOT_FILES, operating_point, pr_points, roc_points,
    threshold_table, write_prediction_plots,
)
from reports.plots import main as plots_main

# --- the threshold table and the operating point ------------------------------------------------


def _scores(rng: np.random.Generator, n: int, rate: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < rate).astype(int)
    s = np.round(np.clip(0.35 * y + rng.normal(0.35, 0.2, n), 0, 1), 2)  # rounded: many ties
    return y, s


def test_threshold_table_matches_brute_force_and_sklearn():
    y, s = _scores(np.random.default_rng(0), 400)
    table = threshold_table(y, s)
    assert np.isinf(table["threshold"].iloc[0]) and table["tp"].iloc[0] == 0 and table["fp"].iloc[0] == 0
    assert list(table["threshold"].iloc[1:]) == sorted(set(s), reverse=True)
    for k, row in enumerate(table.iloc[1:].itertuples()):
        called = s >= row.threshold
        tp, fp = np.sum(called & (y == 1)), np.sum(called & (y == 0))
        fn, tn = np.sum(~called & (y == 1)), np.sum(~called & (y == 0))
        assert (row.tp, row.fp, row.fn, row.tn) == (tp, fp, fn, tn)
        assert row.sensitivity == pytest.approx(tp / (tp + fn)) and row.specificity == pytest.approx(tn / (tn + fp))
        if k % 10 == 0:  # sklearn is slow per call: every tenth threshold
            assert row.sensitivity == pytest.approx(recall_score(y, called))
            assert row.specificity == pytest.approx(recall_score(1 - y, ~called))
            assert row.f1 == pytest.approx(f1_score(y, called))


def test_operating_point_is_the_highest_threshold_reaching_the_target():
    y, s = _scores(np.random.default_rng(1), 300)
    for target in (0.5, 0.9, 0.95, 1.0):
        point = operating_point(y, s, target)
        brute = max(t for t in set(s) if np.sum((s >= t) & (y == 1)) / y.sum() >= target)
        assert point.threshold == brute
        (tn, fp), (fn, tp) = confusion_matrix(y, s >= brute)
        assert (point.tp, point.fp, point.fn, point.tn) == (tp, fp, fn, tn)
        assert point.sensitivity >= target
        assert point.f1 == pytest.approx(f1_score(y, s >= brute))
    fixed = operating_point(y, s, threshold=0.5)
    assert fixed.threshold == 0.5 and fixed.tp == np.sum((s >= 0.5) & (y == 1))


def test_curve_areas_match_sklearn_and_long_curves_are_thinned():
    for n in (300, 20_000):
        y, s = _scores(np.random.default_rng(n), n)
        s = s + np.random.default_rng(0).normal(0, 1e-3, n)  # mostly distinct scores: long curves
        fpr, tpr, area = roc_points(y, s)
        precision, recall, ap = pr_points(y, s)
        assert area == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert len(fpr) <= MAX_PLOT_POINTS and len(recall) <= MAX_PLOT_POINTS
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)


# --- a work folder with two level-1 models and a stack -------------------------------------------


def _predictions(rng: np.random.Generator, y: np.ndarray, skill: float) -> np.ndarray:
    noise = rng.normal(0, 1, y.shape)
    return 1 / (1 + np.exp(-(skill * (2 * y - 1) + noise - 1.0)))


def _frame(ids, values, folds=None) -> pd.DataFrame:
    table = pd.DataFrame(values, columns=list(LABELS))
    if folds is not None:
        table.insert(0, "fold", folds)
    table.insert(0, "image_id", ids)
    return table


def _png(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (120, 24), colour).save(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data, work = tmp / "synthetic_x", tmp / "work"
    (data / "stage_2_train").mkdir(parents=True)
    work.mkdir()
    rng = np.random.default_rng(7)
    n_train, n_test, per_study = 240, 60, 12
    train_ids = [f"ID_{i:09x}" for i in range(n_train)]
    test_ids = [f"ID_{i:09x}" for i in range(n_train, n_train + n_test)]
    studies = [f"ID_st{k // per_study:08d}" for k in range(n_train + n_test)]
    # Bleeds come in studies: half the studies have one, on some of their slices.
    study_bleeds = rng.random(len(set(studies))) < 0.5
    y_all = np.zeros((n_train + n_test, 6), np.int8)
    for k in range(n_train + n_test):
        if study_bleeds[k // per_study] and rng.random() < 0.5:
            y_all[k, rng.integers(0, 5)] = 1
    y_all[:, 5] = y_all[:, :5].max(axis=1)
    labels = _frame(train_ids, y_all[:n_train])
    labels.to_parquet(work / "labels.parquet", index=False)
    pd.DataFrame({"image_id": train_ids + test_ids, "split": ["train"] * n_train + ["test"] * n_test,
                  "study_id": studies}).to_parquet(work / "metadata.parquet", index=False)
    answers = _frame(test_ids, y_all[n_train:]).melt(id_vars="image_id", var_name="label", value_name="Label")
    answers["ID"] = answers["image_id"] + "_" + answers["label"]
    answers[["ID", "Label"]].to_csv(data / "stage_2_test_answers.csv", index=False)
    folds = np.arange(n_train) % 3
    expected = {}
    for name, skill in (("tiny_a", 1.0), ("tiny_b", 2.0)):
        d = work / "models" / name
        d.mkdir(parents=True)
        oof, test = _predictions(rng, y_all[:n_train], skill), _predictions(rng, y_all[n_train:], skill)
        _frame(train_ids, oof, folds).to_parquet(d / "oof.parquet", index=False)
        _frame(test_ids, test).to_parquet(d / "test.parquet", index=False)
        (d / "config.json").write_text(json.dumps({"arch": "test_resnet", "combination": "bsb", "img_size": 64}))
        curve = pd.DataFrame([[e, 1e-3, 0.5 / e, 0.4 / e, 100.0, 1.0, e == 2] for e in (1, 2)], columns=COLUMNS)
        plot_curves({0: curve}, d / "curves.png", name)
        _png(work / "reports" / "explain" / name / f"{train_ids[0]}_any.png")
        expected[name] = (oof, test)
    expected[MEAN_NAME] = tuple(np.mean([expected[m][i] for m in ("tiny_a", "tiny_b")], axis=0) for i in (0, 1))
    stack_oof, stack_test = _predictions(rng, y_all[:n_train], 3.0), _predictions(rng, y_all[n_train:], 3.0)
    (work / "stack").mkdir()
    _frame(train_ids, stack_oof, folds).to_parquet(work / "stack" / "oof.parquet", index=False)
    _frame(test_ids, stack_test).to_parquet(work / "stack" / "test.parquet", index=False)
    (work / "stack" / "metrics.json").write_text(json.dumps({"models": ["tiny_a", "tiny_b"], "params_source": "default"}))
    expected[STACK_NAME] = (stack_oof, stack_test)
    # An unfinished model: listed in a note, not scored.
    (work / "models" / "tiny_c" / "fold0").mkdir(parents=True)
    # Predictions for another dataset (an unknown image): left out with a note, the rest still reported.
    (work / "models" / "tiny_d").mkdir(parents=True)
    _frame(["ID_fffffffff", *train_ids[1:]], _predictions(rng, y_all[:n_train], 1.0), folds).to_parquet(
        work / "models" / "tiny_d" / "oof.parquet", index=False)
    return data, work, y_all[:n_train], y_all[n_train:], expected


def reference_wll(y: np.ndarray, p: np.ndarray) -> float:
    """The competition metric from sklearn's per-label log loss (equal counts per label)."""
    per_label = [log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(6)]
    return float(np.dot(LABEL_WEIGHTS, per_label) / LABEL_WEIGHTS.sum())


def test_prediction_plots_next_to_the_predictions(work):
    data, w, y_train, _, _ = work
    labels = pd.read_parquet(w / "labels.parquet")
    out = write_prediction_plots(w / "models" / "tiny_a", labels, "tiny_a")
    for key, name in PLOT_FILES.items():
        assert out[key] == w / "models" / "tiny_a" / name
        assert Image.open(out[key]).format == "PNG"
    point = json.loads((w / "models" / "tiny_a" / OPERATING_POINT_FILE).read_text())
    confusion = pd.read_csv(w / "models" / "tiny_a" / CONFUSION_FILE).set_index("truth")
    assert confusion.loc["any = 1", "called positive"] == point["tp"]
    assert confusion.loc["any = 0", "called negative"] == point["tn"]
    assert point["tp"] + point["fn"] == y_train[:, 5].sum() and point["sensitivity"] >= 0.95
    with pytest.raises(ValueError, match="no label"):
        write_prediction_plots(w / "models" / "tiny_a", labels.iloc[5:], "tiny_a")


def test_plots_are_skipped_until_the_predictions_labels_or_options_change(work, tmp_path, monkeypatch):
    import reports.plots as plots

    data, shared, *_ = work
    folder = Path(shutil.copytree(shared / "models" / "tiny_a", tmp_path / "tiny_a"))
    labels = pd.read_parquet(shared / "labels.parquet")
    drawn: list[str] = []
    real_plot_roc = plots.plot_roc
    monkeypatch.setattr(plots, "plot_roc", lambda *a: drawn.append(a[2]) or real_plot_roc(*a))

    def draw(table: pd.DataFrame = labels, sensitivity: float = 0.95) -> float:
        write_prediction_plots(folder, table, "tiny_a", sensitivity)
        return json.loads((folder / OPERATING_POINT_FILE).read_text())["threshold"]

    first = draw()
    draw()
    assert len(drawn) == 1  # nothing changed: nothing drawn
    oof_path = folder / "oof.parquet"
    stat = oof_path.stat()
    oof = pd.read_parquet(oof_path)
    oof["any"] = 1.0 - oof["any"]  # same size, same mtime, other content
    oof.to_parquet(oof_path, index=False)
    assert oof_path.stat().st_size == stat.st_size
    os.utime(oof_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert draw() != first and len(drawn) == 2
    flipped = labels.copy()
    flipped.loc[0, "any"] = 1 - flipped.loc[0, "any"]
    draw(flipped)
    draw(flipped, 0.9)
    assert len(drawn) == 4
    (folder / PLOT_FILES["pr"]).unlink()  # a missing output is redrawn
    draw(flipped, 0.9)
    assert len(drawn) == 5 and (folder / PLOT_FILES["pr"]).is_file()


def test_plots_cli_for_a_model_and_the_stack(work, capsys):
    data, w, *_ = work
    assert run_main(plots_main, ["--data", str(data), "--work", str(w), "--stack"], prog="plots") == 0
    printed = capsys.readouterr().out.split()
    assert str(w / "stack" / PLOT_FILES["threshold"]) in printed and len(printed) == 5
    assert run_main(plots_main, ["--data", str(data), "--work", str(w), "--model", "tiny_c"], prog="plots") == 2
    err = capsys.readouterr().err
    assert "oof.parquet not found" in err and len(err.strip().splitlines()) == 1
    argv = ["--data", str(data), "--work", str(w), "--model", "tiny_c", "--skip-missing"]
    assert run_main(plots_main, argv, prog="plots") == 0  # make oof FOLDS=0: nothing to draw yet, not an error
    assert "once every fold is done" in capsys.readouterr().err


def _parse(page: str) -> ET.Element:
    """Strict: the page must be well-formed (XHTML-style) markup."""
    assert page.startswith("<!DOCTYPE html>")
    return ET.fromstring(page[len("<!DOCTYPE html>"):])


def _table_after(root: ET.Element, heading_id: str) -> dict[str, list[str]]:
    body = root.find("body")
    children = list(body)
    start = next(i for i, el in enumerate(children) if el.get("id") == heading_id)
    table = next(el for el in children[start:] if el.tag == "table")
    rows = table.findall("tr")
    out = {}
    for tr in rows[1:]:
        cells = ["".join(td.itertext()) for td in tr.findall("td")]
        out[cells[0]] = cells
    return out


def test_report_is_self_contained_valid_and_scores_every_model(work):
    data, w, y_train, y_test, expected = work
    path = build_report(data, w, explain_top=0)
    assert path == w / "reports" / "index.html"
    page = path.read_text(encoding="utf-8")
    root = _parse(page)

    images = root.iter("img")
    n_images = 0
    for img in images:
        src = img.get("src")
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        png.verify()
        n_images += 1
    # 3 plots per folder (2 models + stack), 2 training curves, 2 explanation panels.
    assert n_images == 3 * 3 + 2 + 2
    assert not re.search(r"(src|href)=\"(?!data:|#)", page), "the page must not link to anything outside itself"
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    for a in root.iter("a"):
        assert a.get("href")[1:] in ids, a.get("href")

    overview = _table_after(root, "overview")
    assert list(overview) == ["tiny_a", "tiny_b", MEAN_NAME, STACK_NAME]
    for name, (oof, test) in expected.items():
        cells = overview[name]
        assert float(cells[2]) == pytest.approx(reference_wll(y_train, oof), abs=1e-4)
        assert float(cells[-1]) == pytest.approx(reference_wll(y_test, test), abs=1e-4)  # test, from the answers
    assert "tiny_c: not finished" in page
    assert "tiny_d: left out: tiny_d OOF: 1 image(s) have no label (first: ID_fffffffff)" in page
    best = [el for el in root.iter("td") if el.get("class") == "best"]
    assert best, "the best value of each column is marked"


def test_report_without_models_and_cli(tmp_path, capsys):
    data, w = tmp_path / "comp", tmp_path / "work"
    (data / "stage_2_train").mkdir(parents=True)
    w.mkdir()
    rc = run_main(report_main, ["--data", str(data), "--work", str(w)], prog="report")
    assert rc == 2 and "make prepare" in capsys.readouterr().err
    pd.DataFrame({"image_id": ["ID_000000001"], **{lb: [0] for lb in LABELS}}).to_parquet(w / "labels.parquet")
    pd.DataFrame({"image_id": ["ID_000000001"], "split": ["train"], "study_id": ["s"]}).to_parquet(w / "metadata.parquet")
    rc = run_main(report_main, ["--data", str(data), "--work", str(w)], prog="report")
    out = capsys.readouterr().out.strip()
    assert rc == 0 and out == str(w / "reports" / "index.html")
    page = Path(out).read_text()
    _parse(page)
    assert "No finished model yet" in page


def test_a_rerun_with_unchanged_inputs_skips_and_a_change_rebuilds(work, tmp_path):
    data, shared, *_ = work
    w = tmp_path / "work"
    shutil.copytree(shared, w)
    said: list[str] = []
    path = build_report(data, w, explain_top=0, log=said.append)
    first = path.stat().st_mtime_ns
    # What a second `make demo` does before the report: the plots step redraws each model's plots
    # (same bytes, new mtimes) and the stack rewrites identical tables.
    write_prediction_plots(w / "models" / "tiny_a", pd.read_parquet(w / "labels.parquet"), "tiny_a")
    stack_oof = w / "stack" / "oof.parquet"
    stack_oof.write_bytes(stack_oof.read_bytes())
    assert build_report(data, w, explain_top=0, log=said.append) == path
    assert path.stat().st_mtime_ns == first and said[-1].endswith("up to date (no input changed since it was written)")
    # New predictions, or other options, rebuild it.
    table = pd.read_parquet(stack_oof)
    table["any"] = 1 - table["any"]
    table.to_parquet(stack_oof, index=False)
    build_report(data, w, explain_top=0, log=said.append)
    second = path.stat().st_mtime_ns
    assert second != first
    build_report(data, w, explain_top=0, max_panels=1, log=said.append)
    assert path.stat().st_mtime_ns != second


def test_panels_the_report_drew_are_redrawn_when_the_weights_change(work, tmp_path, monkeypatch):
    import level1_models.explain as explain

    data, shared, *_ = work
    w = tmp_path / "work"
    shutil.copytree(shared, w)
    drawn: list[str] = []

    def fake_explain(name, data_dir, work_dir, top, progress):  # the real one needs a trained network
        drawn.append(name)
        out = Path(work_dir) / "reports" / "explain" / name / f"panel{len(drawn)}.png"
        _png(out)
        return [out]

    monkeypatch.setattr(explain, "explain_images", fake_explain)
    shutil.rmtree(w / "reports" / "explain" / "tiny_b")  # tiny_a keeps its hand-made panel: never replaced
    weights = w / "models" / "tiny_b" / "fold0" / "best.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights 1")
    build_report(data, w, explain_top=1)
    assert drawn == ["tiny_b"]
    build_report(data, w, explain_top=1, max_panels=3)  # rebuilt page, same weights: the panel is kept
    assert drawn == ["tiny_b"]
    weights.write_bytes(b"weights 2")
    build_report(data, w, explain_top=1)
    assert drawn == ["tiny_b", "tiny_b"]
    assert sorted(p.name for p in (w / "reports" / "explain" / "tiny_b").glob("*.png")) == ["panel2.png"]
    assert (w / "reports" / "explain" / "tiny_a").is_dir() and list((w / "reports" / "explain" / "tiny_a").glob("*.png"))
