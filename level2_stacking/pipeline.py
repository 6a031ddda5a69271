"""`make stack`: frame -> (Optuna) -> cross-validated LightGBM -> stack outputs and the report.

Writes under WorkPaths.stack the same files a level-1 model folder holds (``oof.parquet`` with
its fold, ``test.parquet``), so the submission writer treats the stacker like any model, plus
``metrics.json`` (the report tables, the parameters and where they came from), ``fitted/`` (what
`make predict` applies to new studies, level2_stacking.fitted) and ``.inputs.json`` (a stamp of
every input: a rerun with nothing changed reuses the outputs instead of fitting again).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS
from competition.labels import read_labels
from competition.layout import Layout, LayoutError
from competition.paths import WorkPaths
from competition.study_level import DEFAULT_TARGET_SENSITIVITY
import features.tabular as tabular_module
from features.tabular import TabularFeatureConfig
from competition.atomic import write_json, write_parquet
from competition.stamp import is_current, write_stamp
from level2_stacking.fitted import MANIFEST as FITTED_MANIFEST
from level2_stacking.fitted import FittedStack, fitted_dir
from level2_stacking.blend import any_at_least_subtypes, any_rule_gain, blend, fit_blend_weights
from level2_stacking.frame import (
    EMBEDDINGS_OOF_FILE, EMBEDDINGS_TEST_FILE, OOF_FILE, TEST_FILE, StackFrame, StackFrameError, align_exact,
    build_stack_frame, fold_dir, resolve_models,
)
from level2_stacking.lgbm import (
    FULL_SIZE_ROWS, EARLY_STOPPING_ROUNDS, NUM_BOOST_ROUND, cross_validate, default_threads, sized_params,
)
from level2_stacking.report import STACK_ROW, format_table, oof_sources, score_table, study_table
from level2_stacking.sequence import SequenceSettings, cross_validate_sequence
from level2_stacking.sequence_data import build_sequence_inputs
from level2_stacking.tune import (
    BEST_PARAMS_FILE, TUNE_SHARE, default_storage, load_best_params, patient_subsample, save_best_params, study_name,
    tune,
)

METRICS_FILE = "metrics.json"


STACKERS = ("lgbm", "seq", "blend")
LGBM_ROW, SEQ_ROW, BLEND_ROW = "lightgbm", "sequence model", "blend"
COMPONENT_DIRS = {LGBM_ROW: "lightgbm", SEQ_ROW: "sequence"}  # each stacker's own outputs under stack/


@dataclass(frozen=True)
class StackSettings:
    models: Sequence[str] | None = None
    stacker: str = "blend"                 # lgbm, seq or blend (both, weights fit on OOF)
    tune: bool = False
    trials: int = 20
    storage: str | None = None
    tune_share: float = TUNE_SHARE
    num_threads: int = field(default_factory=default_threads)
    k_neighbours: int = 5
    num_boost_round: int = NUM_BOOST_ROUND
    early_stopping_rounds: int | None = EARLY_STOPPING_ROUNDS
    sequence: SequenceSettings = SequenceSettings()
    embedding_dim: int = 256
    use_embeddings: bool = True
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    progress: bool = True
    params: dict[str, object] | None = None  # LightGBM parameters over the default or tuned ones (small data, tests)

    def __post_init__(self) -> None:
        if self.stacker not in STACKERS:
            raise ValueError(f"unknown stacker {self.stacker!r}; choose one of {', '.join(STACKERS)}")


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
        metadata = pd.read_parquet(paths.metadata, columns=["image_id", "patient_id"])
        rows = patient_subsample(frame.train_ids, metadata, s.tune_share)
        print(f"tuning on {rows.sum()} of {len(rows)} train rows ({s.tune_share:.0%} of the patients, at least "
              f"the tuning minimum); the best parameters are then refit on every row", flush=True)
        params, loss, study = tune(
            frame.x_train[rows], frame.y[rows], frame.folds[rows], trials=s.trials,
            storage=s.storage or default_storage(paths.stack), name=name, num_threads=s.num_threads,
            num_boost_round=s.num_boost_round, early_stopping_rounds=s.early_stopping_rounds, progress=s.progress,
        )
        save_best_params(best_path, params, loss, name, frame.models, len(study.trials))
        print(f"tuned: best CV weighted log loss {loss:.5f} over {len(study.trials)} trials -> {best_path}")
        return params, f"tuned ({best_path.name})"
    saved = load_best_params(best_path)
    if saved is None:
        n = len(frame.y)  # untuned: the defaults sized to the train rows (as they are from FULL_SIZE_ROWS on)
        return sized_params(n), "default" if n >= FULL_SIZE_ROWS else f"default, sized to {n} rows"
    if sorted(saved.get("models", [])) != sorted(frame.models):
        print(f"note: {best_path.name} was tuned on models {saved.get('models')}, stacking {frame.models}")
    return {**saved["params"], "num_threads": s.num_threads}, f"tuned ({best_path.name})"


def _table(ids: np.ndarray, p: np.ndarray, folds: np.ndarray | None = None) -> pd.DataFrame:
    """Sorted by image_id, as level-1 outputs are (the frame's rows are in series order)."""
    table = pd.DataFrame(p, columns=list(LABELS))
    if folds is not None:
        table.insert(0, "fold", folds)
    table.insert(0, "image_id", ids)
    return table.sort_values("image_id").reset_index(drop=True)


def _fit_stackers(paths: WorkPaths, frame: StackFrame, s: StackSettings) -> tuple[dict, dict, dict, dict]:
    """(oof by stacker, test by stacker, facts for metrics.json, the fitted models for FittedStack)
    for the stackers ``s.stacker`` asks for."""
    oof, test, facts = {}, {}, {}
    fitted = {"boosters": {}, "sequence": {}, "maps": {}, "blend_weights": None}
    if s.stacker in ("lgbm", "blend"):
        params, source = _choose_params(paths, frame, s)
        params = {**params, **(s.params or {}), "num_threads": s.num_threads}
        start = time.perf_counter()
        result = cross_validate(
            frame.x_train, frame.y, frame.folds, frame.x_test, params=params, num_boost_round=s.num_boost_round,
            early_stopping_rounds=s.early_stopping_rounds, progress=s.progress, keep_models=True,
        )
        oof[LGBM_ROW], test[LGBM_ROW] = result.oof, result.test
        fitted["boosters"] = result.models
        facts.update(params=params, params_source=source, n_features=int(frame.x_train.shape[1]),
                     lgbm_seconds=time.perf_counter() - start,
                     fold_weighted_log_loss=result.fold_losses,
                     best_iterations={label: result.best_iterations[:, j].tolist() for j, label in enumerate(LABELS)})
    if s.stacker in ("seq", "blend"):
        metadata = pd.read_parquet(paths.metadata, columns=["image_id", "series_id", "slice_index"])
        inputs = build_sequence_inputs(frame, metadata, s.embedding_dim, s.use_embeddings)
        print(inputs.note, flush=True)
        start = time.perf_counter()
        seq = cross_validate_sequence(inputs, frame.y, frame.folds, s.sequence, progress=s.progress)
        oof[SEQ_ROW], test[SEQ_ROW] = seq.oof, seq.test
        fitted["sequence"], fitted["maps"] = seq.models, inputs.maps
        facts.update(sequence=asdict(s.sequence), sequence_note=inputs.note, sequence_seconds=time.perf_counter() - start,
                     sequence_seconds_per_epoch=seq.seconds_per_epoch, sequence_fold_weighted_log_loss=seq.fold_losses)
    if s.stacker == "blend":
        weights = fit_blend_weights(frame.y, oof[LGBM_ROW], oof[SEQ_ROW])
        oof[BLEND_ROW] = blend(oof[LGBM_ROW], oof[SEQ_ROW], weights)
        test[BLEND_ROW] = blend(test[LGBM_ROW], test[SEQ_ROW], weights)
        facts["blend_weights_lightgbm"] = dict(zip(LABELS, weights.tolist()))
        fitted["blend_weights"] = weights
    return oof, test, facts, fitted


STAMP_FILE = ".inputs.json"  # what the stack's outputs were made from (competition.stamp)


def stack_inputs(paths: WorkPaths, models: Sequence[str]) -> list[Path]:
    """Every file the stack reads: the prepared tables, each model's pooled and per-fold outputs
    (embeddings by size and mtime, the rest by content), and the code that turns them into a stack."""
    files = [paths.metadata, paths.folds, paths.labels]
    fold_ids = sorted(pd.read_parquet(paths.folds, columns=["fold"])["fold"].unique()) if paths.folds.is_file() else []
    for m in models:
        folder = paths.model_dir(m)
        files += [folder / OOF_FILE, folder / TEST_FILE]
        for k in fold_ids:
            files += [fold_dir(folder, k) / name for name in (OOF_FILE, TEST_FILE, EMBEDDINGS_OOF_FILE, EMBEDDINGS_TEST_FILE)]
    code = Path(__file__).parent
    return files + sorted(code.glob("*.py")) + [Path(tabular_module.__file__)]


def _stamp_options(settings: StackSettings, data_dir: Path | str) -> dict:
    options = asdict(settings)
    options.pop("progress")
    return json.loads(json.dumps({**options, "data": str(Path(data_dir).resolve())}))  # as the stamp reads back


def run_stack(data_dir: Path | str, work_dir: Path | str | None = None, settings: StackSettings = StackSettings(),
              refit: bool = False) -> StackOutcome:
    """Fit level 2 and write its outputs; when nothing it reads (files, settings, code) changed
    since the last run, the finished outputs are reused (``refit`` fits again anyway)."""
    paths = WorkPaths.for_data(data_dir, work_dir)
    names = resolve_models(paths, settings.models)
    stamp, inputs = paths.stack / STAMP_FILE, stack_inputs(paths, names)
    outputs = [paths.stack / OOF_FILE, paths.stack / TEST_FILE, paths.stack / METRICS_FILE,
               fitted_dir(paths.stack) / FITTED_MANIFEST]
    options = _stamp_options(settings, data_dir)
    if not refit and is_current(stamp, outputs, inputs, options):
        print(f"{paths.stack}: up to date (no level-1 output, table, setting or code changed since it was fit); "
              f"reusing it (`--refit` fits again)", flush=True)
        return _outcome_from_metrics(paths)
    stamp.unlink(missing_ok=True)  # a run stopped half way must not look finished
    outcome = _fit_and_write(paths, data_dir, settings)
    write_stamp(stamp, inputs, options)
    return outcome


def _outcome_from_metrics(paths: WorkPaths) -> StackOutcome:
    """The outcome of the finished run, read back from its metrics.json."""
    metrics = json.loads((paths.stack / METRICS_FILE).read_text())

    def table(key: str) -> pd.DataFrame | None:
        if key not in metrics:
            return None
        frame = pd.DataFrame.from_dict(metrics[key], orient="index")
        frame.index.name = "source"
        return frame

    return StackOutcome(table("scores"), table("study_level"), paths.stack / OOF_FILE, paths.stack / TEST_FILE,
                        paths.stack / METRICS_FILE, metrics.get("params_source", "none"),
                        table("test_scores"), table("test_study_level"))


def _fit_and_write(paths: WorkPaths, data_dir: Path | str, settings: StackSettings) -> StackOutcome:
    feature_config = TabularFeatureConfig(k_neighbours=settings.k_neighbours)
    print(f"building level-2 features under {paths.stack} ...", flush=True)
    start = time.perf_counter()
    frame = build_stack_frame(paths, settings.models, feature_config)
    print(f"stacking {len(frame.models)} level-1 model(s) {', '.join(frame.models)}: "
          f"{len(frame.train_ids)} train x {frame.x_train.shape[1]} features, {len(frame.test_ids)} test rows "
          f"(features in {time.perf_counter() - start:.1f} s)", flush=True)
    paths.stack.mkdir(parents=True, exist_ok=True)
    oof, test, facts, fitted = _fit_stackers(paths, frame, settings)
    final = {"lgbm": LGBM_ROW, "seq": SEQ_ROW, "blend": BLEND_ROW}[settings.stacker]
    # The `any` rule is kept only where it lowers the OOF loss of the final predictions.
    gain = any_rule_gain(frame.y, oof[final])
    stack_oof, stack_test = oof[final], test[final]
    if gain > 0:
        stack_oof, stack_test = any_at_least_subtypes(stack_oof), any_at_least_subtypes(stack_test)
    print(f"`any` >= the largest subtype: OOF loss {'-' if gain > 0 else '+'}{abs(gain):.5f} -> "
          f"{'kept' if gain > 0 else 'not applied'}", flush=True)

    for name, p in oof.items():  # each stacker's own outputs, for the report
        if name in COMPONENT_DIRS and len(oof) > 1:
            folder = paths.stack / COMPONENT_DIRS[name]
            write_parquet(folder / OOF_FILE, _table(frame.train_ids, p, frame.folds))
            write_parquet(folder / TEST_FILE, _table(frame.test_ids, test[name]))
    oof_path, test_path = paths.stack / OOF_FILE, paths.stack / TEST_FILE
    write_parquet(oof_path, _table(frame.train_ids, stack_oof, frame.folds))
    write_parquet(test_path, _table(frame.test_ids, stack_test))
    # What produced the test predictions, for `make predict` on new studies.
    FittedStack(frame.models, sorted(int(k) for k in np.unique(frame.folds)), settings.stacker, feature_config,
                [str(c) for c in frame.x_train.columns], sequence_settings=settings.sequence,
                any_rule=gain > 0, **fitted).save(paths.stack)

    components = {name: p for name, p in oof.items() if len(oof) > 1}
    sources = oof_sources(frame.level1_oof, stack_oof, components)
    scores = score_table(frame.y, sources)
    metadata = pd.read_parquet(paths.metadata, columns=["image_id", "study_id"])
    studies = study_table(frame.train_ids, frame.y, sources, metadata, settings.target_sensitivity)
    test_scores = test_studies = None
    y_test = _test_answers(data_dir, frame.test_ids)
    any_test_gain = None
    if y_test is not None:
        test_sources = oof_sources(frame.level1_test, stack_test, {n: p for n, p in test.items() if n in components})
        test_scores = score_table(y_test, test_sources)
        test_studies = study_table(frame.test_ids, y_test, test_sources, metadata, settings.target_sensitivity,
                                   thresholds=studies["threshold"].to_dict())
        any_test_gain = any_rule_gain(y_test, test[final])
    metrics_path = paths.stack / METRICS_FILE
    write_json(metrics_path, _jsonable({
        "models": frame.models,
        "stacker": settings.stacker,
        "params_source": facts.get("params_source", "none (no LightGBM)"),
        **facts,
        "feature_config": asdict(feature_config),
        "test_features": "per fold model" if frame.test_per_fold else "mean of the fold models (no fold<k>/test.parquet)",
        "any_rule": {"applied": gain > 0, "oof_gain": gain, "test_gain": any_test_gain},
        "oof_weighted_log_loss": float(scores.loc[STACK_ROW, "weighted"]),
        "scores": scores.to_dict(orient="index"),
        "study_level": studies.to_dict(orient="index"),
        "target_sensitivity": settings.target_sensitivity,
        **({} if test_scores is None else {
            "test_scores": test_scores.to_dict(orient="index"),
            "test_study_level": test_studies.to_dict(orient="index"),
        }),
    }))
    return StackOutcome(scores, studies, oof_path, test_path, metrics_path, facts.get("params_source", "none"),
                        test_scores, test_studies)


def _jsonable(value):
    """numpy scalars and int keys made JSON-ready; NaN (an undefined AUC) becomes null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
