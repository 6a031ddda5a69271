"""`make report`: one self-contained HTML page for a dataset's work folder.

    python -m reports.html_report --data DATA [--work WORK] [--explain-top 2] [--max-panels 4]

The page holds every model's scores side by side (each level-1 model with complete OOF
predictions, their plain mean, and the level-2 stack): slice-level weighted log loss, per-label
log loss and ROC AUC, the ``any`` operating point, study-level diagnosis, and the test score when
the dataset carries its answers (synthetic data); then per model the ROC, precision-recall and
threshold plots, the training curves and a few explanation panels. Everything is computed here
from the ``oof.parquet`` / ``test.parquet`` files and the labels, so every column means the same
for every row. Images are embedded as base64 PNG and the style sheet is inline: the file can be
mailed or archived alone. It is written to ``WorkPaths.reports / "index.html"``.

A rerun whose inputs (labels, metadata, answers, every file of the model and stack folders and of
the explanation panels) and options are unchanged returns at once (``reports/.inputs.json`` holds
their fingerprint). Panels the report drew are redrawn when their model's checkpoints change.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.metric import per_label_log_loss, weighted_log_loss
from competition.paths import WorkPaths
from competition.stamp import is_current, write_stamp
from reports.leaderboard import PLOT_NAME, leaderboard_section
from competition.study_level import DEFAULT_TARGET_SENSITIVITY, study_report_from_slices
from reports.plots import (
    OOF_FILE, PLOT_FILES, aligned_truth, operating_point, write_prediction_plots,
)

REPORT_FILE = "index.html"
STAMP_FILE = ".inputs.json"
TEST_FILE = "test.parquet"
MEAN_NAME = "mean of level 1"
STACK_NAME = "stack"


@dataclass
class Source:
    """One row of the report: a set of OOF predictions (and test predictions when there are)."""

    name: str
    level: str  # "level 1", "level 1 mean", "level 2"
    oof: pd.DataFrame
    test: pd.DataFrame | None = None
    folder: Path | None = None
    description: str = ""
    scores: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def find_sources(paths: WorkPaths) -> tuple[list[Source], list[str]]:
    """Every level-1 folder with ``oof.parquet`` and the stack (in that order); plus one note per
    model folder that is not finished yet."""
    sources, notes = [], []
    model_dirs = sorted(d for d in paths.models.iterdir() if d.is_dir()) if paths.models.is_dir() else []
    for d in model_dirs:
        if not (d / OOF_FILE).is_file():
            done = _read_json(d / "metrics.json").get("folds_done")
            notes.append(f"{d.name}: not finished (folds done: {done if done is not None else 'none'}); left out")
            continue
        cfg = _read_json(d / "config.json")
        what = ", ".join(str(cfg[k]) for k in ("arch", "combination") if k in cfg)
        if "img_size" in cfg:
            what += f", {cfg['img_size']} px"
        test = pd.read_parquet(d / TEST_FILE) if (d / TEST_FILE).is_file() else None
        sources.append(Source(d.name, "level 1", pd.read_parquet(d / OOF_FILE), test, d, what))
    if (paths.stack / OOF_FILE).is_file():
        meta = _read_json(paths.stack / "metrics.json")
        over = ", ".join(meta.get("models", [])) or "?"
        # Each stacker's own predictions (make stack writes them when it blends), then the final stack.
        for sub, what in (("lightgbm", f"LightGBM over {over}; parameters {meta.get('params_source', '?')}"),
                          ("sequence", f"sequence model over {over}; {meta.get('sequence_note', '')}")):
            d = paths.stack / sub
            if (d / OOF_FILE).is_file():
                test = pd.read_parquet(d / TEST_FILE) if (d / TEST_FILE).is_file() else None
                sources.append(Source(f"{STACK_NAME} {sub}", "level 2", pd.read_parquet(d / OOF_FILE), test, d, what))
        what = f"{meta.get('stacker', 'lgbm')} over {over}"
        if meta.get("blend_weights_lightgbm"):
            what += "; LightGBM weight per label " + ", ".join(f"{v:.2f}" for v in meta["blend_weights_lightgbm"].values())
        test = pd.read_parquet(paths.stack / TEST_FILE) if (paths.stack / TEST_FILE).is_file() else None
        sources.append(Source(STACK_NAME, "level 2", pd.read_parquet(paths.stack / OOF_FILE), test, paths.stack, what))
    return sources, notes


def _mean_source(level1: Sequence[Source]) -> Source:
    def mean_of(tables: list[pd.DataFrame]) -> pd.DataFrame:
        ids = tables[0]["image_id"]
        for t in tables[1:]:
            if set(t["image_id"]) != set(ids):
                raise ValueError("level-1 predictions cover different images; rerun the models on the same folds table")
        aligned = [t.set_index("image_id").loc[ids, list(LABELS)].to_numpy(np.float64) for t in tables]
        out = pd.DataFrame(np.mean(aligned, axis=0), columns=list(LABELS))
        out.insert(0, "image_id", ids.to_numpy())
        return out

    tests = [s.test for s in level1]
    test = mean_of(tests) if all(t is not None for t in tests) else None
    return Source(MEAN_NAME, "level 1 mean", mean_of([s.oof for s in level1]), test, None,
                  f"plain mean of {', '.join(s.name for s in level1)}")


def score_source(source: Source, labels: pd.DataFrame, metadata: pd.DataFrame, answers: pd.DataFrame | None,
                 target_sensitivity: float) -> dict:
    """Slice-level scores, the `any` operating point, study-level diagnosis and (answers) the test score."""
    from sklearn.metrics import roc_auc_score  # here: an up-to-date report returns without importing sklearn

    y, p = aligned_truth(source.oof, labels, f"{source.name} OOF")
    auc = {label: float(roc_auc_score(y[:, j], p[:, j])) if 0 < y[:, j].sum() < len(y) else float("nan")
           for j, label in enumerate(LABELS)}
    j = LABELS.index("any")
    scores = {
        "n": len(y),
        "weighted_log_loss": weighted_log_loss(y, p),
        "log_loss": per_label_log_loss(y, p),
        "auc": auc,
        "mean_auc": float(np.nanmean(list(auc.values()))) if not all(np.isnan(list(auc.values()))) else float("nan"),
        "operating_point": operating_point(y[:, j], p[:, j], target_sensitivity),
        "study": study_report_from_slices(source.oof[["image_id", "any"]], labels, metadata, target_sensitivity),
    }
    if answers is not None and source.test is not None:
        yt, pt = aligned_truth(source.test, answers, f"{source.name} test")
        scores["test_weighted_log_loss"] = weighted_log_loss(yt, pt)
    return scores


# --- HTML ---------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1500px;
       color: #1d1d1f; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: right; }
th { background: #f3f3f5; } td.name, th.name { text-align: left; }
td.best { font-weight: bold; background: #e6f4ea; }
tr.level2 td { background: #fbf7e9; } tr.level2 td.best { background: #e6f4ea; }
.figs { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.figs img { border: 1px solid #ddd; max-width: 100%; }
img.panel { width: 100%; border: 1px solid #ddd; margin-bottom: 6px; }
.note { color: #8a5300; } .small { font-size: 12px; color: #555; }
nav a { margin-right: 12px; }
"""


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return "-" if not np.isfinite(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def _anchor(name: str) -> str:
    return "m-" + "".join(c if c.isalnum() else "-" for c in name)


def _table(rows: list[tuple[Source, list[object]]], header: list[str], better: list[str | None]) -> str:
    """Rows of values; ``better`` per column: "min", "max" or None; the best value of a column is bold."""
    best = []
    for c, rule in enumerate(better):
        values = [float(v[c]) for _, v in rows if isinstance(v[c], (int, float, np.floating)) and np.isfinite(v[c])]
        best.append(None if rule is None or not values else (min(values) if rule == "min" else max(values)))
    out = ["<table>", "<tr><th class=\"name\">model</th><th class=\"name\">level</th>"
           + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for source, values in rows:
        cls = " class=\"level2\"" if source.level == "level 2" else ""
        cells = []
        for c, v in enumerate(values):
            is_best = best[c] is not None and isinstance(v, (int, float, np.floating)) and np.isfinite(v) and float(v) == best[c]
            cells.append(("<td class=\"best\">" if is_best else "<td>") + f"{_fmt(v)}</td>")
        link = f"<a href=\"#{_anchor(source.name)}\">{html.escape(source.name)}</a>"
        out.append(f"<tr{cls}><td class=\"name\">{link}</td><td class=\"name\">{html.escape(source.level)}</td>"
                   + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(path: Path, alt: str, css_class: str = "", width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    attrs = f" class=\"{css_class}\"" if css_class else ""
    attrs += f" width=\"{width}\"" if width else ""
    return f"<img{attrs} alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{data}\" />"


def _confusion_html(point) -> str:
    return ("<table><tr><th class=\"name\">truth</th><th>called positive</th><th>called negative</th></tr>"
            f"<tr><td class=\"name\">any = 1</td><td>{point.tp}</td><td>{point.fn}</td></tr>"
            f"<tr><td class=\"name\">any = 0</td><td>{point.fp}</td><td>{point.tn}</td></tr></table>")


def render_html(title: str, subtitle: str, sources: list[Source], notes: list[str], data_summary: str,
                figures: dict[str, dict[str, Path]], panels: dict[str, list[Path]], target_sensitivity: float,
                has_answers: bool) -> str:
    parts = [
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\" />",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\" />",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class=\"sub\">{subtitle}</p>",
        "<nav>" + "".join(f"<a href=\"#{_anchor(s.name)}\">{html.escape(s.name)}</a>" for s in sources) + "</nav>",
        data_summary,
    ]
    parts += [f"<p class=\"note\">{html.escape(n)}</p>" for n in notes]
    if not sources:
        parts.append("<p class=\"note\">No finished model yet: run <code>make oof MODEL=...</code> "
                     "(and <code>make stack</code>), then <code>make report</code> again.</p></body></html>")
        return "\n".join(parts)

    parts.append("<h2 id=\"overview\">Overview (out-of-fold, every train image once)</h2>")
    header = ["slice wLL", "mean AUC", "AUC any", "study AUC", "study sensitivity", "study specificity"]
    better: list[str | None] = ["min", "max", "max", "max", "max", "max"]
    if has_answers:
        header.append("test wLL (answers)")
        better.append("min")
    rows = []
    for s in sources:
        sc = s.scores
        row = [sc["weighted_log_loss"], sc["mean_auc"], sc["auc"]["any"], sc["study"]["roc_auc"],
               sc["study"]["sensitivity"], sc["study"]["specificity"]]
        if has_answers:
            row.append(sc.get("test_weighted_log_loss"))
        rows.append((s, row))
    parts.append(_table(rows, header, better))
    parts.append("<p class=\"small\">wLL: the competition's weighted log loss (any x2). Study level: per-study max "
                 f"of <i>any</i>, at the highest threshold whose study sensitivity reaches {target_sensitivity:g}. "
                 "Best value of each column in bold.</p>")
    parts.append("<table><tr><th class=\"name\">model</th><th class=\"name\">what</th></tr>"
                 + "".join(f"<tr><td class=\"name\">{html.escape(s.name)}</td><td class=\"name\">{html.escape(s.description)}</td></tr>"
                           for s in sources) + "</table>")

    parts.append("<h2>Slice level: log loss per label</h2>")
    parts.append(_table([(s, [s.scores["weighted_log_loss"], *(s.scores["log_loss"][lb] for lb in LABELS)]) for s in sources],
                        ["weighted", *LABELS], ["min"] * (1 + len(LABELS))))
    parts.append("<h2>Slice level: ROC AUC per label</h2>")
    parts.append(_table([(s, [s.scores["mean_auc"], *(s.scores["auc"][lb] for lb in LABELS)]) for s in sources],
                        ["mean", *LABELS], ["max"] * (1 + len(LABELS))))
    parts.append(f"<h2>Slice level: <i>any</i> at the recall-favouring threshold (sensitivity &gt;= {target_sensitivity:g})</h2>")
    op_rows = []
    for s in sources:
        op = s.scores["operating_point"]
        op_rows.append((s, [op.threshold, op.sensitivity, op.specificity, op.precision, op.f1, op.tp, op.fp, op.fn, op.tn]))
    parts.append(_table(op_rows, ["threshold", "sensitivity", "specificity", "precision", "F1", "TP", "FP", "FN", "TN"],
                        [None, None, "max", "max", "max", None, None, None, None]))
    parts.append("<h2>Study level: is there a bleed in this study?</h2>")
    st_rows = [(s, [s.scores["study"][k] for k in ("n_studies", "n_positive", "roc_auc", "threshold", "accuracy",
                                                    "sensitivity", "specificity")]) for s in sources]
    parts.append(_table(st_rows, ["studies", "positive", "ROC AUC", "threshold", "accuracy", "sensitivity", "specificity"],
                        [None, None, "max", None, "max", "max", "max"]))

    for s in sources:
        parts.append(f"<h2 id=\"{_anchor(s.name)}\">{html.escape(s.name)} <span class=\"small\">({html.escape(s.level)}; "
                     f"{html.escape(s.description)})</span></h2>")
        figs = figures.get(s.name, {})
        if figs:
            parts.append("<div class=\"figs\">" + "".join(
                _img(figs[k], f"{k} of {s.name}") for k in ("roc", "pr", "threshold") if k in figs) + "</div>")
        parts.append(f"<p>Confusion of <i>any</i> at t = {_fmt(s.scores['operating_point'].threshold)}:</p>")
        parts.append(_confusion_html(s.scores["operating_point"]))
        if "curves" in figs:
            parts.append("<h3>Training curves</h3><div class=\"figs\">" + _img(figs["curves"], f"training curves of {s.name}")
                         + "</div>")
        if panels.get(s.name):
            parts.append("<h3>Explanations (input, Grad-CAM, Guided Backprop, DeconvNet, Guided Grad-CAM)</h3>")
            parts += [_img(p, f"explanation {p.stem} by {s.name}", "panel") for p in panels[s.name]]
    parts.append("</body></html>")
    return "\n".join(parts)


def _data_summary(labels: pd.DataFrame, metadata: pd.DataFrame) -> str:
    train = metadata[metadata["split"] == "train"] if "split" in metadata.columns else metadata
    cells = "".join(f"<td>{int(labels[lb].sum())} ({labels[lb].mean():.3f})</td>" for lb in LABELS)
    return ("<table><tr><th class=\"name\">train images</th><th>studies</th>"
            + "".join(f"<th>{lb}</th>" for lb in LABELS) + "</tr>"
            f"<tr><td class=\"name\">{len(labels)}</td><td>{train['study_id'].nunique()}</td>{cells}</tr></table>"
            "<p class=\"small\">Positives per label (rate).</p>")


def explanation_panels(paths: WorkPaths, source: Source, data_dir: Path | str | None, work_dir: Path | str | None,
                       explain_top: int, max_panels: int, log: Callable[[str], None]) -> list[Path]:
    """A level-1 model's existing panels; when it has none, ``explain_top`` are made first."""
    folder = paths.reports / "explain" / source.name
    found = sorted(folder.glob("*.png")) if folder.is_dir() else []
    checkpoints = sorted(source.folder.glob("fold*/best.pt")) if source.folder is not None else []
    stamp = folder / STAMP_FILE
    if found and stamp.is_file() and not is_current(stamp, found, checkpoints):  # drawn by us from older weights
        for panel in found:
            panel.unlink()
        found = []
    if not found and explain_top > 0 and source.folder is not None and data_dir is not None \
            and any(source.folder.glob("fold*/best.pt")):
        from level1_models.explain import explain_images  # level 1 is below: the reports sit on the top floor

        try:
            found = explain_images(source.name, data_dir, work_dir, top=explain_top, progress=False)
            write_stamp(stamp, checkpoints)
        except (FileNotFoundError, ValueError, KeyError) as err:
            log(f"note: no explanation panels for {source.name}: {err}")
    return found[:max_panels]


def build_report(
    data_dir: Path | str,
    work_dir: Path | str | None = None,
    explain_top: int = 2,
    max_panels: int = 4,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    submissions_log: Path | None = None,
) -> Path:
    """Score every output folder, refresh their plots, and write ``reports/index.html``; returns its path."""
    from competition.labels import read_labels
    from competition.layout import Layout, LayoutError

    paths = WorkPaths.for_data(data_dir, work_dir)
    for needed in (paths.labels, paths.metadata):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found; run `make prepare DATA={data_dir}` first")
    labels = pd.read_parquet(paths.labels)
    metadata = pd.read_parquet(paths.metadata)
    try:
        answers_path = Layout.find(data_dir).answers
    except LayoutError:
        answers_path = None
    out = paths.reports / REPORT_FILE
    stamp = paths.reports / STAMP_FILE
    options = {"explain_top": explain_top, "max_panels": max_panels, "target_sensitivity": target_sensitivity}
    board = [submissions_log, submissions_log.parent / PLOT_NAME] if submissions_log else []  # the CV-LB section

    def inputs() -> list[Path]:
        folders = (paths.models, paths.stack, paths.reports / "explain")
        return [paths.labels, paths.metadata, *([answers_path] if answers_path else []), *board,
                *(f for d in folders if d.is_dir() for f in d.rglob("*") if not f.name.startswith("."))]

    if is_current(stamp, [out], inputs(), options):
        log(f"{out}: up to date (no input changed since it was written)")
        return out
    answers = read_labels(answers_path) if answers_path is not None else None

    found, notes = find_sources(paths)

    def scored(source: Source) -> bool:
        """Score a source; one that does not fit the labels is left out with a note, not fatal."""
        try:
            source.scores = score_source(source, labels, metadata, answers, target_sensitivity)
        except ValueError as err:
            notes.append(f"{source.name}: left out: {err}")
            return False
        return True

    sources = [s for s in found if scored(s)]
    level1 = [s for s in sources if s.level == "level 1"]
    if len(level1) >= 2:
        try:
            mean = _mean_source(level1)
        except ValueError as err:
            notes.append(f"{MEAN_NAME}: left out: {err}")
        else:
            if scored(mean):
                sources.insert(len(level1), mean)
    figures: dict[str, dict[str, Path]] = {}
    panels: dict[str, list[Path]] = {}
    for s in sources:
        if s.folder is not None:
            figs = write_prediction_plots(s.folder, labels, s.name, target_sensitivity)
            figures[s.name] = {k: v for k, v in figs.items() if k in PLOT_FILES}
            if (s.folder / "curves.png").is_file():
                figures[s.name]["curves"] = s.folder / "curves.png"
        if s.level == "level 1":
            panels[s.name] = explanation_panels(paths, s, data_dir, work_dir, explain_top, max_panels, log)

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"dataset <code>{html.escape(Path(data_dir).name)}</code>, work folder "
                f"<code>{html.escape(str(paths.root))}</code>, written {now}"
                + ("; test scores use the dataset's answers file" if answers is not None else ""))
    page = render_html(f"RSNA intracranial hemorrhage: {Path(data_dir).resolve().name}", subtitle, sources, notes,
                       _data_summary(labels, metadata), figures, panels, target_sensitivity, answers is not None)
    if submissions_log is not None:
        page = page.replace("</body></html>", leaderboard_section(submissions_log) + "</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    write_stamp(stamp, inputs(), options)  # after the plots and panels this run wrote into those folders
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.html_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="competition folder in the Kaggle layout")
    p.add_argument("--work", type=Path, default=None, help="work folder (default work/<basename of DATA>)")
    p.add_argument("--explain-top", type=int, default=2,
                   help="panels to make for a model that has none yet (its top-`any` OOF slices; 0: none)")
    p.add_argument("--max-panels", type=int, default=4, help="explanation panels shown per model")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="operating point of the threshold tables")
    p.add_argument("--submissions-log", type=Path, default=None,
                   help="the submissions log: adds its table and CV-vs-leaderboard figure (make leaderboard)")
    args = p.parse_args(argv)
    print(build_report(args.data, args.work, args.explain_top, args.max_panels, args.target_sensitivity,
                       submissions_log=args.submissions_log))
    return 0


if __name__ == "__main__":
    from competition.cli import run_main

    sys.exit(run_main(main, prog="report"))
