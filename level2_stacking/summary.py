"""The ten-second table at the end of `make demo`: every model against the constant prior.

Reads what the stages wrote (level-1 metrics, the stack's metrics, the submission file) and, when
the dataset carries an answers file (the synthetic competition does), scores the submission file
itself with the competition scorer, so the figure is the one Kaggle would report.

    python -m level2_stacking.summary --data DATA [--work WORK] [--submission FILE]
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


def summary_table(data_dir: Path, paths: WorkPaths, submission: Path | None) -> pd.DataFrame:
    metrics_path = paths.stack / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} missing; run `make stack DATA={data_dir}` first")
    stack = json.loads(metrics_path.read_text())
    answers = Layout.find(data_dir).answers
    prior = prior_scores(paths, answers)
    rows = [{"source": "constant prior", "OOF wLL": prior["oof"], "test wLL": prior["test"],
             "study acc": np.nan, "study AUC": 0.5}]
    # Each level-2 stacker that ran (LightGBM, the sequence model, their blend), then the final stack.
    level2 = [n for n in ("lightgbm", "sequence model", "blend") if n in stack["scores"]]
    for name in [*stack["models"], *level2, "stacker"]:
        study = stack.get("study_level", {}).get(name, {})
        test = stack.get("test_scores", {}).get(name, {})
        rows.append({
            "source": f"{name} (level 2)" if name in ("stacker", *level2) else name,
            "OOF wLL": stack["scores"][name]["weighted"],
            "test wLL": test.get("weighted"),
            "study acc": study.get("accuracy"),
            "study AUC": study.get("roc_auc"),
        })
    if submission is not None and answers is not None:
        from competition.synthetic import score_submission

        scored = score_submission(submission, answers)
        rows.append({"source": f"submission file {submission.name}", "OOF wLL": np.nan,
                     "test wLL": scored["weighted_log_loss"], "study acc": np.nan, "study AUC": np.nan})
    return pd.DataFrame(rows).set_index("source")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m level2_stacking.summary", description=__doc__.splitlines()[0])
    add_data_args(parser)
    parser.add_argument("--submission", type=Path, default=None, help="submission file to score against the answers")
    args = parser.parse_args(argv)
    paths = WorkPaths.for_data(args.data, args.work)
    table = summary_table(args.data, paths, args.submission)
    n_train = len(pd.read_parquet(paths.folds))
    print(f"\n{args.data}: weighted log loss (lower is better) over {n_train} train slices out of fold"
          " and on the test answers; study level at the recall-favouring threshold (OOF)")
    print(table.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="summary"))
