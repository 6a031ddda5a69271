"""`make stack`: frame -> (Optuna) -> cross-validated LightGBM -> stack outputs and the report.

Writes under WorkPaths.stack the same files a level-1 model folder holds (``oof.parquet`` with
its fold, ``test.parquet``), so the submission writer treats the stacker like any model, plus
``metrics.json`` (the report tables, the parameters and where they came from).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.labels import read_labels
from competition.layout import Layout, LayoutError
from competition.paths import WorkPaths
from competition.study_level import DEFAULT_TARGET_SENSITIVITY
from features.tabular import TabularFeatureConfig
from level2_stacking.frame import OOF_FILE, TEST_FILE, StackFrameError, align_exact, build_stack_frame
from level2_stacking.lgbm import DEFAULT_PARAMS, EARLY_STOPPING_ROUNDS, NUM_BOOST_ROUND, cross_validate
from level2_stacking.report import format_table, oof_sources, score_table, study_table
from level2_stacking.tune import (
    BEST_PARAMS_FILE, default_storage, load_best_params, save_best_params, study_name, tune,
)

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class StackSettings:
    models: Sequence[str] | None = None
    tune: bool = False
    trials: int = 20
    storage: str | None = None
    num_threads: int = 2
    k_neighbours: int = 5
    num_boost_round: int = NUM_BOOST_ROUND
    early_stopping_rounds: int | None = EARLY_STOPPING_ROUNDS
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    progress: bool = True


@dataclass(frozen=True)
class StackOutcome:
    scores: pd.DataFrame
    study_level: pd.DataFrame
    oof_path: Path
    test_path: Path
    metrics_path: Path
    params_source: str
    test_scores: pd.DataFrame | None = None       # only where DATA has the answers (synthetic data)
    test_study_level: pd.DataFrame | None = None

    def report(self) -> str:
        lines = [
            "OOF log loss (weighted = the competition metric):",
            format_table(self.scores),
            "",
            "Study-level diagnosis on OOF (per-study max of `any`, threshold chosen for the target sensitivity):",
            format_table(self.study_level),
        ]
        if self.test_scores is not None and self.test_study_level is not None:
            lines += [
                "",
                "Test log loss against the answers in DATA:",
                format_table(self.test_scores),
                "",
                "Study-level diagnosis on test (thresholds chosen on OOF):",
                format_table(self.test_study_level),
            ]
        return "\n".join(lines)


def _test_answers(data_dir: Path | str, test_ids: np.ndarray) -> np.ndarray | None:
    """The true test labels (N, 6) in ``test_ids`` order where DATA carries them, else None."""
    try:
        layout = Layout.find(data_dir)
    except LayoutError:
        return None
    if layout.answers is None or not len(test_ids):
        return None
    answers = read_labels(layout.answers)
    try:
        aligned = align_exact(answers, pd.Index(test_ids), f"answers {layout.answers} vs the test predictions")
    except StackFrameError as exc:
        print(f"note: not scoring test: {exc}")
        return None
    return aligned[list(LABELS)].to_numpy(np.float64)


def _choose_params(paths: WorkPaths, frame, s: StackSettings) -> tuple[dict[str, object], str]:
    best_path = paths.stack / BEST_PARAMS_FILE
    if s.tune:
        name = study_name(frame.models)
        params, loss, study = tune(
            frame.x_train, frame.y, frame.folds, trials=s.trials, storage=s.storage or default_storage(paths.stack),
            name=name, num_threads=s.num_threads, num_boost_round=s.num_boost_round,
            early_stopping_rounds=s.early_stopping_rounds, progress=s.progress,
        )
        save_best_params(best_path, params, loss, name, frame.models, len(study.trials))
        print(f"tuned: best CV weighted log loss {loss:.5f} over {len(study.trials)} trials -> {best_path}")
        return params, f"tuned ({best_path.name})"
    saved = load_best_params(best_path)
    if saved is None:
        return dict(DEFAULT_PARAMS), "default"
    if sorted(saved.get("models", [])) != sorted(frame.models):
        print(f"note: {best_path.name} was tuned on models {saved.get('models')}, stacking {frame.models}")
    return {**saved["params"], "num_threads": s.num_threads}, f"tuned ({best_path.name})"


def run_stack(data_dir: Path | str, work_dir: Path | str | None = None, settings: StackSettings = StackSettings()) -> StackOutcome:
    paths = WorkPaths.for_data(data_dir, work_dir)
    feature_config = TabularFeatureConfig(k_neighbours=settings.k_neighbours)
    print(f"building level-2 features under {paths.stack} ...", flush=True)
    start = time.perf_counter()
    frame = build_stack_frame(paths, settings.models, feature_config)
    print(f"stacking {len(frame.models)} level-1 model(s) {', '.join(frame.models)}: "
          f"{len(frame.train_ids)} train x {frame.x_train.shape[1]} features, {len(frame.test_ids)} test rows "
          f"(features in {time.perf_counter() - start:.1f} s)", flush=True)
    paths.stack.mkdir(parents=True, exist_ok=True)
    params, source = _choose_params(paths, frame, settings)
    params = {**params, "num_threads": settings.num_threads}
    result = cross_validate(
        frame.x_train, frame.y, frame.folds, frame.x_test, params=params, num_boost_round=settings.num_boost_round,
        early_stopping_rounds=settings.early_stopping_rounds, progress=settings.progress,
    )

    oof = pd.DataFrame(result.oof, columns=list(LABELS))
    oof.insert(0, "fold", frame.folds)
    oof.insert(0, "image_id", frame.train_ids)
    test = pd.DataFrame(result.test, columns=list(LABELS))
    test.insert(0, "image_id", frame.test_ids)
    oof_path, test_path = paths.stack / OOF_FILE, paths.stack / TEST_FILE
    # Sorted by image_id, as level-1 outputs are (the frame's rows are in series order).
    oof.sort_values("image_id").to_parquet(oof_path, index=False)
    test.sort_values("image_id").to_parquet(test_path, index=False)

    sources = oof_sources(frame.level1_oof, result.oof)
    scores = score_table(frame.y, sources)
    metadata = pd.read_parquet(paths.metadata, columns=["image_id", "study_id"])
    studies = study_table(frame.train_ids, frame.y, sources, metadata, settings.target_sensitivity)
    test_scores = test_studies = None
    y_test = _test_answers(data_dir, frame.test_ids)
    if y_test is not None:
        test_sources = oof_sources(frame.level1_test, result.test)
        test_scores = score_table(y_test, test_sources)
        test_studies = study_table(frame.test_ids, y_test, test_sources, metadata, settings.target_sensitivity,
                                   thresholds=studies["threshold"].to_dict())
    metrics_path = paths.stack / METRICS_FILE
    metrics_path.write_text(json.dumps({
        "models": frame.models,
        "params": params,
        "params_source": source,
        "feature_config": asdict(feature_config),
        "n_features": int(frame.x_train.shape[1]),
        "oof_weighted_log_loss": result.loss,
        "fold_weighted_log_loss": result.fold_losses,
        "best_iterations": {label: result.best_iterations[:, j].tolist() for j, label in enumerate(LABELS)},
        "scores": scores.to_dict(orient="index"),
        "study_level": studies.to_dict(orient="index"),
        "target_sensitivity": settings.target_sensitivity,
        **({} if test_scores is None else {
            "test_scores": test_scores.to_dict(orient="index"),
            "test_study_level": test_studies.to_dict(orient="index"),
        }),
    }, indent=2, default=float) + "\n")
    return StackOutcome(scores, studies, oof_path, test_path, metrics_path, source, test_scores, test_studies)
