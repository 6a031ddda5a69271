"""`make stack`: frame -> (Optuna) -> cross-validated LightGBM and sequence model -> the nested
blend over them and level 1, the study call (level2_stacking.choices) -> outputs and the report.

Writes under WorkPaths.stack the same files a level-1 model folder holds (``oof.parquet`` with
its fold, ``test.parquet``), so the submission writer treats the stacker like any model, plus
``oof_studies.parquet`` / ``test_studies.parquet`` (the stack's study probability per study),
``metrics.json`` (the report tables, the weights, the parameters and where they came from), ``fitted/`` (what
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
from competition.metric import weighted_log_loss
from competition.labels import read_labels
from competition.layout import Layout, LayoutError
from competition.paths import WorkPaths
from competition.study_level import DEFAULT_TARGET_SENSITIVITY
import features.tabular as tabular_module
from features.cache import BRAIN_FILE
from features.tabular import TabularFeatureConfig
from competition.atomic import write_json, write_parquet
from competition.stamp import is_current, write_stamp
from level2_stacking.fitted import MANIFEST as FITTED_MANIFEST
from level2_stacking.fitted import FittedStack, fitted_dir
from level2_stacking.blend import any_rule_gain, check_form
from level2_stacking.choices import Level2Choices, choose
from level2_stacking.study_model import POOLING
from level2_stacking.frame import (
    EMBEDDINGS_OOF_FILE, EMBEDDINGS_TEST_FILE, OOF_FILE, TEST_FILE, StackFrame, StackFrameError, align_exact,
    build_stack_frame, fold_dir, resolve_models,
)
from level2_stacking.lgbm import (
    FULL_SIZE_ROWS, EARLY_STOPPING_ROUNDS, NUM_BOOST_ROUND, cross_validate, default_threads, sized_params,
)
from level2_stacking.report import (
    BLEND_ROW, LGBM_ROW, SEQ_ROW, STACK_ROW, format_table, oof_sources, score_table, study_table,
)
from level2_stacking.sequence import SequenceSettings, cross_validate_sequence
from level2_stacking.sequence_data import build_sequence_inputs
from level2_stacking.tune import (
    BEST_PARAMS_FILE, TUNE_SHARE, default_storage, load_best_params, patient_subsample, save_best_params, study_name,
    tune,
)

METRICS_FILE = "metrics.json"
OOF_STUDIES_FILE = "oof_studies.parquet"    # the stack's nested OOF study probability per study (and fold)
TEST_STUDIES_FILE = "test_studies.parquet"  # its probability per test study
NESTED_NOTE = ("nested OOF: fold k's blend weights and `any` rule were chosen on the other folds' "
               "rows only; the stacker's OOF rows are the concatenation of these fold-k predictions")
FINAL_NOTE = "fitted on every OOF row: the weights and rule that test and `make predict` use"


STACKERS = ("lgbm", "seq", "blend")
COMPONENT_DIRS = {LGBM_ROW: "lightgbm", SEQ_ROW: "sequence"}  # each stacker's own outputs under stack/


@dataclass(frozen=True)
class StackSettings:
    models: Sequence[str] | None = None
    stacker: str = "blend"                 # lgbm, seq or blend (of both and level 1, weights fit on OOF)
    tune: bool = False
    trials: int = 20
    storage: str | None = None
    tune_share: float = TUNE_SHARE
    num_threads: int = field(default_factory=default_threads)
    k_neighbours: int = 5
    any_shifts: tuple[int, ...] = ()       # far neighbours of `any` (TabularFeatureConfig.any_shifts)
    num_boost_round: int = NUM_BOOST_ROUND
    early_stopping_rounds: int | None = EARLY_STOPPING_ROUNDS
    sequence: SequenceSettings = SequenceSettings()
    embedding_dim: int = 256
    use_embeddings: bool = True
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    progress: bool = True
    params: dict[str, object] | None = None  # LightGBM parameters over the default or tuned ones (small data, tests)
    # The image cache's brain ratios as features, where it holds them. Off: not yet shown to lower the
    # stack's nested OOF and test loss on competitions it was not tuned on (README, issue 22).
    brain_ratio: bool = False
    # The blend's form (blend.FORMS or "auto"); per label unless asked (README: "auto" did not lower
    # the loss on six competitions of real tiny-CNN outputs).
    blend_form: str = "per label"

    def __post_init__(self) -> None:
        if self.stacker not in STACKERS:
            raise ValueError(f"unknown stacker {self.stacker!r}; choose one of {', '.join(STACKERS)}")
        check_form(self.blend_form)
        TabularFeatureConfig(k_neighbours=self.k_neighbours, any_shifts=tuple(self.any_shifts))  # refused now, not after level 1 is read


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
    weights: pd.DataFrame | None = None           # the final blend weights, input x label
    tuning_scores: pd.DataFrame | None = None     # OOF of Optuna's tuning patients, apart from the headline
    notes: tuple[str, ...] = ()
    blend_form: str = ""                          # per label, pooled or one input, and how it was chosen

    def report(self) -> str:
        lines = [*(f"note: {n}" for n in self.notes), "",
                 "OOF log loss, nested (weighted = the competition metric):", format_table(self.scores)]
        if self.tuning_scores is not None:
            lines += ["", "OOF log loss of Optuna's tuning patients (not the headline):", format_table(self.tuning_scores)]
        if self.weights is not None:
            lines += ["", "Blend weights per input and label (fitted on every OOF row; used for test and `make predict`"
                      + (f"; form: {self.blend_form}" if self.blend_form else "") + "):", format_table(self.weights, 3)]
        lines += [
            "",
            f"Study-level diagnosis on OOF (each source: the max of `any` over a study's slices, "
            f"\"{STACK_ROW}\" nested; threshold chosen for the target sensitivity):",
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


def _choose_params(paths: WorkPaths, frame, s: StackSettings) -> tuple[dict[str, object], str, np.ndarray | None]:
    """(LightGBM parameters, where they came from, the mask of the rows of Optuna's tuning patients
    or None when the parameters were not tuned)."""
    best_path = paths.stack / BEST_PARAMS_FILE
    if s.tune:
        name = study_name(frame.models)
        rows = _tuning_rows(paths, frame, s.tune_share)
        print(f"tuning on {rows.sum()} of {len(rows)} train rows ({s.tune_share:.0%} of the patients, at least "
              f"the tuning minimum); the best parameters are then refit on every row", flush=True)
        params, loss, study = tune(
            frame.x_train[rows], frame.y[rows], frame.folds[rows], trials=s.trials,
            storage=s.storage or default_storage(paths.stack), name=name, num_threads=s.num_threads,
            num_boost_round=s.num_boost_round, early_stopping_rounds=s.early_stopping_rounds, progress=s.progress,
        )
        save_best_params(best_path, params, loss, name, frame.models, len(study.trials), s.tune_share)
        print(f"tuned: best CV weighted log loss {loss:.5f} over {len(study.trials)} trials -> {best_path}")
        return params, f"tuned ({best_path.name})", rows
    saved = load_best_params(best_path)
    if saved is None:
        n = len(frame.y)  # untuned: the defaults sized to the train rows (as they are from FULL_SIZE_ROWS on)
        return sized_params(n), "default" if n >= FULL_SIZE_ROWS else f"default, sized to {n} rows", None
    if sorted(saved.get("models", [])) != sorted(frame.models):
        print(f"note: {best_path.name} was tuned on models {saved.get('models')}, stacking {frame.models}")
    rows = _tuning_rows(paths, frame, float(saved.get("tune_share", TUNE_SHARE)))
    return {**saved["params"], "num_threads": s.num_threads}, f"tuned ({best_path.name})", rows


def _tuning_rows(paths: WorkPaths, frame, share: float) -> np.ndarray:
    metadata = pd.read_parquet(paths.metadata, columns=["image_id", "patient_id"])
    return patient_subsample(frame.train_ids, metadata, share)


def _table(ids: np.ndarray, p: np.ndarray, folds: np.ndarray | None = None) -> pd.DataFrame:
    """Sorted by image_id, as level-1 outputs are (the frame's rows are in series order)."""
    table = pd.DataFrame(p, columns=list(LABELS))
    if folds is not None:
        table.insert(0, "fold", folds)
    table.insert(0, "image_id", ids)
    return table.sort_values("image_id").reset_index(drop=True)


def _fit_stackers(paths: WorkPaths, frame: StackFrame, s: StackSettings) -> tuple[dict, dict, dict, dict]:
    """(oof by stacker, test by stacker, facts for metrics.json, the fitted models for FittedStack)
    for the stackers ``s.stacker`` asks for (the blend over them and level 1 comes after)."""
    oof, test, facts = {}, {}, {}
    fitted = {"boosters": {}, "sequence": {}, "maps": {}}
    if s.stacker in ("lgbm", "blend"):
        params, source, tuned = _choose_params(paths, frame, s)
        params = {**params, **(s.params or {}), "num_threads": s.num_threads}
        start = time.perf_counter()
        result = cross_validate(
            frame.x_train, frame.y, frame.folds, frame.x_test, params=params, num_boost_round=s.num_boost_round,
            early_stopping_rounds=s.early_stopping_rounds, progress=s.progress, keep_models=True,
        )
        oof[LGBM_ROW], test[LGBM_ROW] = result.oof, result.test
        fitted["boosters"] = result.models
        facts.update(params=params, params_source=source, n_features=int(frame.x_train.shape[1]),
                     lgbm_seconds=time.perf_counter() - start, tuning_rows=tuned,
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
    brain = sorted(paths.cache.glob(f"*px/{BRAIN_FILE}"))  # a cache rebuilt with brain ratios: refit with them
    return files + brain + sorted(code.glob("*.py")) + [Path(tabular_module.__file__)]


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
               paths.stack / OOF_STUDIES_FILE, fitted_dir(paths.stack) / FITTED_MANIFEST]
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

    weights = metrics.get("blend", {}).get("weights")
    return StackOutcome(table("scores"), table("study_level"), paths.stack / OOF_FILE, paths.stack / TEST_FILE,
                        paths.stack / METRICS_FILE, metrics.get("params_source", "none"),
                        table("test_scores"), table("test_study_level"), None if weights is None else _weights_frame(weights),
                        table("tuning_scores"), tuple(metrics.get("notes", ())), metrics.get("blend", {}).get("form", ""))


def _fit_and_write(paths: WorkPaths, data_dir: Path | str, settings: StackSettings) -> StackOutcome:
    print(f"building level-2 features under {paths.stack} ...", flush=True)
    start = time.perf_counter()
    config = TabularFeatureConfig(k_neighbours=settings.k_neighbours, any_shifts=tuple(settings.any_shifts),
                                  brain_ratio=settings.brain_ratio)
    frame = build_stack_frame(paths, settings.models, config)
    feature_config = frame.config  # brain_ratio off where the cache has none
    print(f"stacking {len(frame.models)} level-1 model(s) {', '.join(frame.models)}: "
          f"{len(frame.train_ids)} train x {frame.x_train.shape[1]} features, {len(frame.test_ids)} test rows "
          f"(features in {time.perf_counter() - start:.1f} s)", flush=True)
    paths.stack.mkdir(parents=True, exist_ok=True)
    oof, test, facts, fitted = _fit_stackers(paths, frame, settings)
    tuned = facts.pop("tuning_rows", None)
    metadata = pd.read_parquet(paths.metadata, columns=["image_id", "study_id"])
    choice = choose(frame, settings.stacker, oof, test, metadata.drop_duplicates("image_id").set_index("image_id")["study_id"],
                    settings.blend_form)
    _print_any_rule(choice)
    if settings.stacker == "blend":
        oof[BLEND_ROW], test[BLEND_ROW] = choice.blend.oof_blend, choice.test_blend
    stack_oof, stack_test = choice.blend.oof, choice.test

    for name, p in oof.items():  # each stacker's own outputs, for the report
        if name in COMPONENT_DIRS and len(oof) > 1:
            folder = paths.stack / COMPONENT_DIRS[name]
            write_parquet(folder / OOF_FILE, _table(frame.train_ids, p, frame.folds))
            write_parquet(folder / TEST_FILE, _table(frame.test_ids, test[name]))
    oof_path, test_path = paths.stack / OOF_FILE, paths.stack / TEST_FILE
    write_parquet(oof_path, _table(frame.train_ids, stack_oof, frame.folds))
    write_parquet(test_path, _table(frame.test_ids, stack_test))
    write_parquet(paths.stack / OOF_STUDIES_FILE, choice.oof_studies())
    write_parquet(paths.stack / TEST_STUDIES_FILE, choice.test_studies())
    # What produced the test predictions, for `make predict` on new studies.
    FittedStack(frame.models, sorted(int(k) for k in np.unique(frame.folds)), settings.stacker, feature_config,
                [str(c) for c in frame.x_train.columns], sequence_settings=settings.sequence,
                blend_names=choice.blend_names, blend_weights=choice.blend.final.weights,
                any_rule=choice.blend.final.any_rule, **fitted).save(paths.stack)

    components = {name: p for name, p in oof.items() if len(oof) > 1}
    sources = oof_sources(frame.level1_oof, stack_oof, components)
    report = _oof_report(frame, sources, choice, metadata, tuned, settings.target_sensitivity)
    test_report = _test_report(data_dir, frame, test, components, choice, metadata, report["study_level"],
                               settings.target_sensitivity)
    metrics_path = paths.stack / METRICS_FILE
    outcome = StackOutcome(report["scores"], report["study_level"], oof_path, test_path, metrics_path,
                           facts.get("params_source", "none"), test_report.get("test_scores"),
                           test_report.get("test_study_level"), _weights_frame(choice.blend.final.weights_table()),
                           report.get("tuning_scores"), tuple(report["notes"]), choice.blend.final.describe_form())
    write_json(metrics_path, _jsonable({
        "models": frame.models,
        "stacker": settings.stacker,
        "params_source": facts.get("params_source", "none (no LightGBM)"),
        **facts,
        "feature_config": asdict(feature_config),
        "test_features": "per fold model" if frame.test_per_fold else "mean of the fold models (no fold<k>/test.parquet)",
        **_choice_facts(choice, test_report.get("y_test")),
        "notes": report["notes"],
        "oof_weighted_log_loss": float(report["scores"].loc[STACK_ROW, "weighted"]),
        "in_sample_oof_weighted_log_loss": report["in_sample"],
        "scores": report["scores"].to_dict(orient="index"),
        **({} if "tuning_scores" not in report else {"tuning_scores": report["tuning_scores"].to_dict(orient="index")}),
        "study_level": report["study_level"].to_dict(orient="index"),
        "target_sensitivity": settings.target_sensitivity,
        **{key: table.to_dict(orient="index") for key, table in test_report.items() if key != "y_test"},
    }))
    return outcome


def _headline(tuned: np.ndarray | None, n: int) -> tuple[np.ndarray, list[str]]:
    """The rows the headline OOF scores (Optuna's untouched patients where there are any) and what to say."""
    notes = [NESTED_NOTE, FINAL_NOTE]
    if tuned is None:
        return np.ones(n, bool), notes
    if tuned.all():
        return tuned, notes + ["every train patient was among Optuna's tuning patients: the LightGBM-based OOF "
                               "figures are tuned on themselves (the test figure is the honest one)"]
    return ~tuned, notes + [f"OOF scores: the {int((~tuned).sum())} rows of the patients Optuna never saw; the "
                            f"{int(tuned.sum())} rows of its tuning patients are scored apart (tuning_scores)"]


def _oof_report(frame: StackFrame, sources: dict, choice: Level2Choices, metadata: pd.DataFrame,
                tuned: np.ndarray | None, target_sensitivity: float) -> dict:
    rows, notes = _headline(tuned, len(frame.y))
    y = frame.y
    out = {"scores": score_table(y[rows], {n: p[rows] for n, p in sources.items()}), "notes": notes}
    if tuned is not None and tuned.any() and not tuned.all():
        out["tuning_scores"] = score_table(y[tuned], {n: p[tuned] for n, p in sources.items()})
    out["in_sample"] = weighted_log_loss(y[rows], choice.blend.in_sample_oof[rows])
    notes.append(f"stacker OOF weighted log loss: nested {out['scores'].loc[STACK_ROW, 'weighted']:.5f}; the final "
                 f"weights and rule scored on the rows they were fitted on (in-sample, optimistic) {out['in_sample']:.5f}")
    out["study_level"] = study_table(frame.train_ids, y, sources, metadata, target_sensitivity)
    return out


def _test_report(data_dir: Path | str, frame: StackFrame, test: dict, components: dict, choice: Level2Choices,
                 metadata: pd.DataFrame, oof_studies: pd.DataFrame, target_sensitivity: float) -> dict:
    """Test scores where DATA has the answers (synthetic data), the study thresholds chosen on OOF."""
    y_test = _test_answers(data_dir, frame.test_ids)
    if y_test is None:
        return {}
    sources = oof_sources(frame.level1_test, choice.test, {n: p for n, p in test.items() if n in components})
    studies = study_table(frame.test_ids, y_test, sources, metadata, target_sensitivity,
                          thresholds=oof_studies["threshold"].to_dict())
    return {"y_test": y_test, "test_scores": score_table(y_test, sources), "test_study_level": studies}


def _choice_facts(choice: Level2Choices, y_test: np.ndarray | None) -> dict:
    final = choice.blend.final
    lgbm = final.weights_table().get(LGBM_ROW) if len(final.names) > 1 else None
    return {
        "blend_weights_lightgbm": lgbm,  # as before the blend had more inputs (reports/html_report.py reads it)
        "blend": {"candidates": choice.blend_names, "weights": final.weights_table(), "fitted_on": FINAL_NOTE,
                  "form": final.describe_form(), "forms_by_fold": {k: c.form for k, c in choice.blend.by_fold.items()},
                  "by_fold": {k: c.weights_table() for k, c in choice.blend.by_fold.items()}},
        "any_rule": {"applied": final.any_rule, "oof_gain": final.any_gain,
                     "by_fold": {k: c.any_rule for k, c in choice.blend.by_fold.items()},
                     "test_gain": None if y_test is None else any_rule_gain(y_test, choice.test_blend)},
        "study_model": {"pooling": POOLING, "oof": "nested: the max of the nested OOF `any` (oof_studies.parquet)"},
    }


def _print_any_rule(choice: Level2Choices) -> None:
    kept = [k for k, c in choice.blend.by_fold.items() if c.any_rule]
    final = choice.blend.final
    print(f"`any` >= the largest subtype: kept for folds {kept} of {sorted(choice.blend.by_fold)} (each chosen on "
          f"the other folds); on every OOF row {'-' if final.any_gain > 0 else '+'}{abs(final.any_gain):.5f} -> "
          f"{'kept' if final.any_rule else 'not applied'} for test and `make predict`", flush=True)


def _weights_frame(weights: dict[str, dict[str, float]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(weights, orient="index", columns=list(LABELS))
    frame.index.name = "input"
    return frame


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
