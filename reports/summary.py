"""The ten-second table at the end of `make demo`: every model against the constant prior.

Reads what the stages wrote (level-1 metrics, the stack's metrics, the submission file) and, when
the dataset carries an answers file (the synthetic competition does), scores the submission file
itself with the competition scorer, so the figure is the one Kaggle would report. Study-level
figures are on test, at the threshold each source reaches 95% sensitivity with on its OOF studies;
the stack is compared with the best single model (by OOF loss) on test, with a paired bootstrap.

    python -m reports.summary --data DATA [--work WORK] [--submission FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from competition.cli import add_data_args, run_main
from competition.constants import LABELS
from competition.labels import read_labels
from competition.layout import Layout
from competition.metric import prior_baseline, weighted_log_loss
from competition.paths import WorkPaths
from competition.study_level import oof_threshold_on_test, paired_bootstrap_difference

STUDY_COLUMNS = {"threshold": "thr (OOF)", "sensitivity": "test sens", "specificity": "test spec",
                 "accuracy": "test acc", "roc_auc": "test AUC", "auc_low": "AUC lo", "auc_high": "AUC hi"}


def prior_scores(paths: WorkPaths, answers: Path | None) -> dict[str, float | None]:
    """The constant prior, out of fold (each fold predicted by the other folds' label rates) and on test."""
    labels = pd.read_parquet(paths.labels)
    folds = pd.read_parquet(paths.folds).merge(labels, on="image_id", validate="one_to_one")
    y = folds[list(LABELS)].to_numpy(float)
    pred = np.empty_like(y)
    for fold in folds["fold"].unique():
        val = (folds["fold"] == fold).to_numpy()
        pred[val] = prior_baseline(y[~val], int(val.sum()))
    out: dict[str, float | None] = {"oof": weighted_log_loss(y, pred), "test": None}
    if answers is not None:
        truth = read_labels(answers)[list(LABELS)].to_numpy(float)
        out["test"] = weighted_log_loss(truth, prior_baseline(y, len(truth)))
    return out


def _predictions(paths: WorkPaths, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = paths.stack if name == "stacker" else paths.model_dir(name)
    return pd.read_parquet(folder / "oof.parquet"), pd.read_parquet(folder / "test.parquet")


def summary_table(data_dir: Path, paths: WorkPaths, submission: Path | None) -> tuple[pd.DataFrame, list[str]]:
    """The table (one row per source) and the lines under it (study counts, stack minus best model)."""
    metrics_path = paths.stack / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} missing; run `make stack DATA={data_dir}` first")
    stack = json.loads(metrics_path.read_text())
    answers = Layout.find(data_dir).answers
    prior = prior_scores(paths, answers)
    rows = [{"source": "constant prior", "OOF wLL": prior["oof"], "test wLL": prior["test"], "test AUC": 0.5}]
    labels = pd.read_parquet(paths.labels)
    truth = read_labels(answers) if answers is not None else None
    metadata = pd.read_parquet(paths.metadata, columns=["image_id", "study_id"])
    notes, figures = [], {}
    # Each level-2 stacker that ran (LightGBM, the sequence model, their blend), then the final stack;
    # study-level figures for the sources with prediction files (the models and the final stack).
    level2 = [n for n in ("lightgbm", "sequence model", "blend") if n in stack["scores"]]
    for name in [*stack["models"], *level2, "stacker"]:
        row = {"source": f"{name} (level 2)" if name in ("stacker", *level2) else name,
               "OOF wLL": stack["scores"][name]["weighted"],
               "test wLL": stack.get("test_scores", {}).get(name, {}).get("weighted")}
        if truth is not None and name not in level2:
            oof, test = _predictions(paths, name)
            figures[name] = oof_threshold_on_test(oof, labels, test, truth, metadata)
            row.update({column: figures[name][key] for key, column in STUDY_COLUMNS.items()})
        rows.append(row)
    if figures:
        f = figures["stacker"]
        notes.append(f"study level: threshold chosen on {f['oof_studies']} OOF studies ({f['oof_positive']} positive), "
                     f"applied unchanged to {f['n_studies']} test studies ({f['n_positive']} positive); "
                     "AUC lo/hi: 95% bootstrap interval over test studies")
        best = min(stack["models"], key=lambda m: stack["scores"][m]["weighted"])
        notes.append(_difference_line(paths, "stacker", best, truth, metadata, f"best single model by OOF ({best})"))
    if submission is not None and answers is not None:
        from competition.synthetic import score_submission

        scored = score_submission(submission, answers)
        rows.append({"source": f"submission file {submission.name}", "test wLL": scored["weighted_log_loss"]})
    return pd.DataFrame(rows).set_index("source"), notes


def _difference_line(paths: WorkPaths, a: str, b: str, truth: pd.DataFrame, metadata: pd.DataFrame, what: str) -> str:
    """Test weighted log loss of a minus b, with a paired bootstrap interval over test studies."""
    test_a, test_b = (_predictions(paths, m)[1].set_index("image_id") for m in (a, b))
    truth = truth.set_index("image_id")
    ids = truth.index
    study = metadata.drop_duplicates("image_id").set_index("image_id")["study_id"].reindex(ids).to_numpy()
    diff, low, high = paired_bootstrap_difference(study, truth.loc[ids, list(LABELS)].to_numpy(float),
                                                  test_a.loc[ids, list(LABELS)].to_numpy(float),
                                                  test_b.loc[ids, list(LABELS)].to_numpy(float))
    return (f"stack minus {what} on test: {diff:+.4f} weighted log loss, 95% interval [{low:+.4f}, {high:+.4f}] "
            f"(paired bootstrap over {len(set(study))} test studies, {len(ids)} slices; negative: the stack is better)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.summary", description=__doc__.splitlines()[0])
    add_data_args(parser)
    parser.add_argument("--submission", type=Path, default=None, help="submission file to score against the answers")
    args = parser.parse_args(argv)
    paths = WorkPaths.for_data(args.data, args.work)
    table, notes = summary_table(args.data, paths, args.submission)
    n_train = len(pd.read_parquet(paths.folds))
    print(f"\n{args.data}: weighted log loss (lower is better) over {n_train} train slices out of fold"
          " and on the test answers")
    print(table.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-"))
    for line in notes:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="summary"))
