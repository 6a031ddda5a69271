"""python -m level2_stacking --data DATA [--work WORK] [--models a,b] [--stacker blend] [--tune] [--trials N]
                             [--any-shifts 10,20] [--brain-ratio] ...

Stacks every level-1 model folder present (or --models) with LightGBM on neighbour and study
features, a sequence model over each series, or their blend (the default: per label, simplex
weights over LightGBM, the sequence model, each level-1 model and their mean); prints the nested
OOF report (fold k's weights and `any` rule chosen on the other folds; each level-1 model, their
plain mean, each stacker, the final stack; overall and per label; the blend weights; study-level
diagnosis by the max of `any` over each study's slices) and writes oof.parquet, test.parquet,
oof_studies.parquet, test_studies.parquet, metrics.json (and best_params.json,
optuna.db with --tune; lightgbm/ and sequence/ with each stacker's own predictions) under the
work folder's stack/, each file atomically. The submission file is written by
`python -m submissions write --stack`.
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting make LightGBM crawl on a shared or busy machine
# (measured: 17x slower on 2 contended cores); sleeping waits cost little on an idle one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from competition.cli import run_main, work_lock  # noqa: E402
from level2_stacking.blend import AUTO, FORMS  # noqa: E402
from level2_stacking.lgbm import default_threads  # noqa: E402
from level2_stacking.pipeline import STACKERS, StackSettings, run_stack  # noqa: E402
from level2_stacking.sequence import SequenceSettings  # noqa: E402
from level2_stacking.tune import TUNE_SHARE  # noqa: E402


def _offsets(text: str) -> tuple[int, ...]:
    """'10,20' -> (10, 20)."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--any-shifts takes comma-separated whole slice offsets such as 10,20, "
                                         f"got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m level2_stacking", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="competition folder (Kaggle layout); names the work folder")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default work/<basename of DATA>)")
    ap.add_argument("--models", default="", help="comma list of level-1 models (default: every model folder present)")
    ap.add_argument("--stacker", choices=STACKERS, default="blend",
                    help="lgbm, seq (the sequence model) or blend (of both and every level-1 model, nested weights; default)")
    ap.add_argument("--tune", action="store_true", help="run the Optuna study first and stack with its best parameters")
    ap.add_argument("--tune-share", type=float, default=TUNE_SHARE,
                    help="share of the train patients Optuna tunes on (at least 200 patients); refit on all")
    ap.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (a rerun resumes)")
    ap.add_argument("--storage", default=None, help="Optuna RDB URL (default: sqlite optuna.db in the stack folder)")
    ap.add_argument("--threads", type=int, default=None,
                    help=f"LightGBM and torch CPU threads (default: every usable core, here {default_threads()})")
    ap.add_argument("--neighbours", type=int, default=5, help="previous/next slices taken as features")
    ap.add_argument("--any-shifts", type=_offsets, default=(),
                    help="far neighbours of `any` as features, e.g. 10,20 (each beyond --neighbours; default none)")
    ap.add_argument("--brain-ratio", action="store_true",
                    help="the image cache's per-slice share of brain pixels (and its neighbours') as features; off by "
                         "default until it lowers the loss on competitions it was not tuned on (README)")
    ap.add_argument("--blend-form", choices=[f.replace(" ", "-") for f in (*FORMS, AUTO)], default="per-label",
                    help="the blend's weights: per label (default), pooled over the labels, the best input alone, or "
                         "auto (chosen by cross-validation over the folds below 200,000 rows; README)")
    ap.add_argument("--rounds", type=int, default=StackSettings.num_boost_round, help="max boosting rounds")
    ap.add_argument("--early-stopping", type=int, default=StackSettings.early_stopping_rounds,
                    help="early-stopping patience (0: train all --rounds)")
    ap.add_argument("--seq-arch", choices=("gru", "transformer"), default=SequenceSettings.arch, help="sequence model")
    ap.add_argument("--seq-epochs", type=int, default=SequenceSettings.epochs, help="sequence model epochs per fold")
    ap.add_argument("--seq-device", default="auto", help="sequence model device: cpu, cuda or auto (cuda when present)")
    ap.add_argument("--embedding-dim", type=int, default=256,
                    help="level-1 embeddings reduced to this many dims (shared space) before the sequence model")
    ap.add_argument("--no-embeddings", action="store_true", help="sequence model on the probabilities alone")
    ap.add_argument("--target-sensitivity", type=float, default=StackSettings.target_sensitivity,
                    help="study-level operating point (sensitivity to reach)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--refit", action="store_true",
                    help="fit again even when no input, setting or code changed since the last run (else it is reused)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or default_threads()
    device = args.seq_device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = StackSettings(
        models=[m for m in args.models.split(",") if m.strip()] or None, stacker=args.stacker,
        tune=args.tune, trials=args.trials, storage=args.storage, tune_share=args.tune_share, num_threads=threads,
        sequence=SequenceSettings(arch=args.seq_arch, epochs=args.seq_epochs, device=device, threads=threads),
        embedding_dim=args.embedding_dim, use_embeddings=not args.no_embeddings,
        k_neighbours=args.neighbours, any_shifts=args.any_shifts, brain_ratio=args.brain_ratio,
        blend_form=args.blend_form.replace("-", " "),
        num_boost_round=args.rounds,
        early_stopping_rounds=args.early_stopping or None, target_sensitivity=args.target_sensitivity,
        progress=not args.no_progress,
    )
    with work_lock(args, "stack"):  # one stacking run per work folder
        outcome = run_stack(args.data, args.work, settings, refit=args.refit)
    print(outcome.report())
    print(f"parameters: {outcome.params_source}")
    print(f"stack OOF: {outcome.oof_path}")
    print(f"stack test: {outcome.test_path}")
    print(f"metrics: {outcome.metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m level2_stacking"))
