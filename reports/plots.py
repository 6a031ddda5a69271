"""The plots a competitor reads every day, for any folder of OOF predictions (a level-1 run, the stack).

Next to the folder's ``oof.parquet`` (redrawn when it, the labels or the options change; skipped otherwise):

* ``roc.png``: ROC curve of each label (AUC in the legend);
* ``pr.png``: precision-recall curve of each label (average precision and prevalence in the legend);
* ``threshold_any.png``: sensitivity, specificity and F1 of ``any`` against the threshold, with the
  recall-favouring operating point marked (the highest threshold whose slice-level sensitivity
  reaches the target, the rule ``competition.study_level`` uses per study);
* ``confusion_any.csv``: the 2 x 2 confusion table of ``any`` at that threshold, and
  ``operating_point_any.json``: the threshold and its counts and rates.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.stamp import is_current, write_stamp
from competition.study_level import DEFAULT_TARGET_SENSITIVITY, threshold_for_sensitivity

OOF_FILE = "oof.parquet"
PLOT_FILES = {"roc": "roc.png", "pr": "pr.png", "threshold": "threshold_any.png"}
CONFUSION_FILE = "confusion_any.csv"
OPERATING_POINT_FILE = "operating_point_any.json"
STAMP_FILE = ".plots.json"  # hidden: the HTML report's own stamp skips dot files


def labels_digest(labels: pd.DataFrame) -> str:
    """A content hash of a labels table (row order included), for the stamp's options."""
    rows = pd.util.hash_pandas_object(labels[["image_id", *LABELS]], index=False).to_numpy()
    return hashlib.blake2b(rows.tobytes(), digest_size=16).hexdigest()


def aligned_truth(predictions: pd.DataFrame, labels: pd.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred), N x 6 each, in ``predictions``' row order; an image without a label is an error."""
    if predictions["image_id"].duplicated().any():
        raise ValueError(f"{what}: an image id appears twice; the predictions table is corrupt, rerun that stage")
    table = labels.drop_duplicates("image_id").set_index("image_id")
    missing = pd.Index(predictions["image_id"]).difference(table.index)
    if len(missing):
        raise ValueError(f"{what}: {len(missing)} image(s) have no label (first: {missing[0]}); "
                         f"were these predictions made for another dataset or folds table?")
    y = table.loc[predictions["image_id"], list(LABELS)].to_numpy(np.float64)
    return y, predictions[list(LABELS)].to_numpy(np.float64)


def threshold_table(y_true: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    """Sensitivity, specificity, precision and F1 of ``score >= t`` at every distinct score t (and
    at +inf, where nothing is called positive), by sorting once: O(N log N)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # the last row of each distinct value
    tp = np.cumsum(y_sorted)[last_of_value]
    fp = np.cumsum(~y_sorted)[last_of_value]
    thresholds = s_sorted[last_of_value]
    tp, fp, thresholds = np.r_[0, tp], np.r_[0, fp], np.r_[np.inf, thresholds]
    pos, neg = int(y.sum()), int((~y).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = tp / pos if pos else np.full(len(tp), np.nan)
        specificity = (neg - fp) / neg if neg else np.full(len(tp), np.nan)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
        f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + (pos - tp), 1), 0.0)
    return pd.DataFrame({"threshold": thresholds, "tp": tp, "fp": fp, "fn": pos - tp, "tn": neg - fp,
                         "sensitivity": sensitivity, "specificity": specificity, "precision": precision, "f1": f1})


@dataclass(frozen=True)
class OperatingPoint:
    """``any`` called positive where ``score >= threshold``."""

    threshold: float
    target_sensitivity: float
    tp: int
    fp: int
    fn: int
    tn: int
    sensitivity: float
    specificity: float
    precision: float
    f1: float


def operating_point(y_true: np.ndarray, score: np.ndarray, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                    threshold: float | None = None) -> OperatingPoint:
    """The recall-favouring threshold (or ``threshold``) and the confusion counts there."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    t = threshold_for_sensitivity(y, s, target_sensitivity) if threshold is None else float(threshold)
    called = s >= t
    tp, fp = int((called & y).sum()), int((called & ~y).sum())
    fn, tn = int((~called & y).sum()), int((~called & ~y).sum())
    nan = float("nan")
    return OperatingPoint(
        threshold=t, target_sensitivity=target_sensitivity, tp=tp, fp=fp, fn=fn, tn=tn,
        sensitivity=tp / (tp + fn) if tp + fn else nan, specificity=tn / (tn + fp) if tn + fp else nan,
        precision=tp / (tp + fp) if tp + fp else nan, f1=2 * tp / (2 * tp + fp + fn) if tp else 0.0,
    )


def confusion_frame(point: OperatingPoint) -> pd.DataFrame:
    """Rows: the truth; columns: what the threshold calls."""
    return pd.DataFrame({"truth": ["any = 1", "any = 0"],
                         "called positive": [point.tp, point.fp], "called negative": [point.fn, point.tn]})


MAX_PLOT_POINTS = 4000  # a curve over 750k slices is drawn through this many of its points


def _thin(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Evenly spaced points of long curves (ends kept): the picture is the same, the PNG is quick."""
    n = len(arrays[0])
    if n <= MAX_PLOT_POINTS:
        return arrays
    keep = np.unique(np.linspace(0, n - 1, MAX_PLOT_POINTS).round().astype(np.int64))
    return tuple(np.asarray(a)[keep] for a in arrays)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    tmp.replace(path)  # a reader never sees half a PNG
    return path


def _finish(plt, fig, ax, out_png: Path, legend_loc: str) -> Path:
    """The common tail of every plot here: legend, grid, layout, atomic save, close."""
    ax.legend(fontsize=8, loc=legend_loc)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_png)
    plt.close(fig)
    return out_png


def roc_points(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(false positive rates, true positive rates) thinned for drawing, and the ROC AUC of the full
    curve (one sort of the scores instead of two)."""
    from sklearn.metrics import auc, roc_curve  # here: a skipped rerun needs neither sklearn nor matplotlib

    fpr, tpr, _ = roc_curve(y_true, score)
    area = float(auc(fpr, tpr))
    fpr, tpr = _thin(fpr, tpr)
    return fpr, tpr, area


def pr_points(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(precision, recall) thinned for drawing, and the average precision of the full curve
    (sklearn's ``average_precision_score`` formula: sum over recall steps of precision)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(y_true, score)
    ap = -float(np.sum(np.diff(recall) * precision[:-1]))
    precision, recall = _thin(precision, recall)
    return precision, recall, ap


def plot_roc(y: np.ndarray, p: np.ndarray, title: str, out_png: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for j, label in enumerate(LABELS):
        if 0 < y[:, j].sum() < len(y):
            fpr, tpr, area = roc_points(y[:, j], p[:, j])
            ax.plot(fpr, tpr, lw=2.2 if label == "any" else 1.3, label=f"{label} (AUC {area:.3f})")
        else:
            ax.plot([], [], " ", label=f"{label} (one class only)")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title=f"ROC: {title}")
    return _finish(plt, fig, ax, out_png, "lower right")


def plot_pr(y: np.ndarray, p: np.ndarray, title: str, out_png: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for j, label in enumerate(LABELS):
        color = f"C{j}"
        if 0 < y[:, j].sum():
            precision, recall, ap = pr_points(y[:, j], p[:, j])
            ax.step(recall, precision, where="post", color=color, lw=2.2 if label == "any" else 1.3,
                    label=f"{label} (AP {ap:.3f}, prevalence {y[:, j].mean():.3f})")
            ax.axhline(y[:, j].mean(), color=color, lw=0.6, ls=":")
        else:
            ax.plot([], [], " ", label=f"{label} (no positive)")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01),
           title=f"precision-recall: {title}")
    return _finish(plt, fig, ax, out_png, "upper right")


def plot_threshold(table: pd.DataFrame, point: OperatingPoint, title: str, out_png: Path) -> Path:
    plt = _pyplot()
    finite = table[np.isfinite(table["threshold"])]
    columns = ("sensitivity", "specificity", "f1")
    thinned = dict(zip(("threshold", *columns), _thin(*(finite[c].to_numpy() for c in ("threshold", *columns)))))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for column, color in zip(columns, ("C3", "C0", "C2")):
        ax.step(thinned["threshold"], thinned[column], where="post", color=color, label=column)
    ax.axvline(point.threshold, color="black", ls="--", lw=1)
    ax.annotate(f"t = {point.threshold:.3f}\nsensitivity {point.sensitivity:.3f}\nspecificity {point.specificity:.3f}"
                f"\nF1 {point.f1:.3f}", xy=(point.threshold, 0.5), xytext=(8, 0), textcoords="offset points",
                fontsize=8, va="center", bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8})
    # Zoom on the scores' range: a weak or calibrated-low model predicts in a narrow band.
    lo, hi = (float(finite["threshold"].min()), float(finite["threshold"].max())) if len(finite) else (0.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05
    ax.set(xlabel="threshold on predicted any", ylabel="rate", xlim=(max(0.0, lo - pad), min(1.0, hi + pad)), ylim=(0, 1.02),
           title=f"any vs threshold: {title}\n(dashed: highest t with sensitivity >= {point.target_sensitivity:g})")
    return _finish(plt, fig, ax, out_png, "lower left")


def write_prediction_plots(pred_dir: Path | str, labels: pd.DataFrame, title: str,
                           target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> dict[str, Path]:
    """ROC, PR and threshold plots, the confusion table and the operating point of the folder's OOF.

    Skipped (the paths are returned as they are) when ``oof.parquet``, the labels and the options
    are those the files were drawn from (``.plots.json`` holds their fingerprint).

    Hook: called by the level-1 trainer once ``oof.parquet`` is written, by ``make stack`` for the
    stack folder, and by the HTML report for any folder that lacks them.
    """
    pred_dir = Path(pred_dir)
    oof_path = pred_dir / OOF_FILE
    if not oof_path.is_file():
        raise FileNotFoundError(f"{oof_path} not found; finish every fold (make oof / make stack) first")
    out = {key: pred_dir / name for key, name in PLOT_FILES.items()}
    out["confusion"], out["operating_point"] = pred_dir / CONFUSION_FILE, pred_dir / OPERATING_POINT_FILE
    stamp = pred_dir / STAMP_FILE
    options = {"labels": labels_digest(labels), "title": title, "target_sensitivity": target_sensitivity}
    if is_current(stamp, out.values(), [oof_path], options):
        return out
    y, p = aligned_truth(pd.read_parquet(oof_path), labels, str(oof_path))
    j = LABELS.index("any")
    if not 0 < y[:, j].sum() < len(y):
        raise ValueError(f"{oof_path}: `any` has a single class in the labels, so no ROC or threshold exists")
    point = operating_point(y[:, j], p[:, j], target_sensitivity)
    plot_roc(y, p, title, out["roc"])
    plot_pr(y, p, title, out["pr"])
    plot_threshold(threshold_table(y[:, j], p[:, j]), point, title, out["threshold"])
    confusion_frame(point).to_csv(out["confusion"], index=False)
    values = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(point).items()}
    out["operating_point"].write_text(json.dumps(values, indent=2) + "\n")
    write_stamp(stamp, [oof_path], options)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m reports.plots --data DATA [--work WORK] (--model NAME | --stack)``: the
    plots of one output folder (for ``make oof`` / ``make stack`` to run after they finish)."""
    import argparse

    from competition.paths import WorkPaths

    p = argparse.ArgumentParser(prog="python -m reports.plots", description=main.__doc__)
    p.add_argument("--data", required=True, type=Path, help="competition folder in the Kaggle layout")
    p.add_argument("--work", type=Path, default=None, help="work folder (default work/<basename of DATA>)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", default=None, help="a level-1 model folder's name")
    which.add_argument("--stack", action="store_true", help="the level-2 stack folder")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY)
    p.add_argument("--skip-missing", action="store_true",
                   help="say so and succeed when the folder has no oof.parquet yet (make oof FOLDS=0)")
    args = p.parse_args(argv)
    paths = WorkPaths.for_data(args.data, args.work)
    if not paths.labels.is_file():
        raise FileNotFoundError(f"{paths.labels} not found; run `make prepare DATA={args.data}` first")
    folder = paths.stack if args.stack else paths.model_dir(args.model)
    if args.skip_missing and not (folder / OOF_FILE).is_file():
        print(f"no {folder / OOF_FILE} yet: its plots are drawn once every fold is done", file=sys.stderr)
        return 0
    written = write_prediction_plots(folder, pd.read_parquet(paths.labels), "stack" if args.stack else args.model,
                                     args.target_sensitivity)
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    from competition.cli import run_main

    sys.exit(run_main(main, prog="plots"))
