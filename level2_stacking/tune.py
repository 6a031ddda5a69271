"""Optuna tuning of the stacker: minimise the cross-validated weighted log loss, with pruning.

The study lives in an RDB (SQLite in the stack folder by default): an interrupted study resumes
where it stopped (a trial killed mid-way is marked failed once its heartbeat lapses, and is
retried), and several machines can tune one study through a shared PostgreSQL URL. ``trials``
is the study's total of finished trials, so rerunning the same command finishes the job rather
than starting over. The best parameters go to ``best_params.json``; the next plain stack uses them.
"""
from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from competition.atomic import write_json
from competition.progress import is_terminal
from level2_stacking.lgbm import DEFAULT_PARAMS, EARLY_STOPPING_ROUNDS, FIXED_PARAMS, NUM_BOOST_ROUND, cross_validate

BEST_PARAMS_FILE = "best_params.json"
# Optuna tunes on this share of the train patients (at least TUNE_MIN_PATIENTS), drawn once with a
# fixed seed; the best parameters are then refit on every row. On the competition (~17k patients)
# that is ~150k rows: a trial costs a fifth of a full cross-validation. Small datasets (the demo)
# tune on every patient, so their OOF figure is tuned on itself; the test figure is the honest one.
# The stack's report scores the untouched patients apart from the tuning ones (pipeline.py).
TUNE_SHARE = 0.2
TUNE_MIN_PATIENTS = 200
STUDY_DB_FILE = "optuna.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def patient_subsample(train_ids: np.ndarray, metadata: pd.DataFrame, share: float = TUNE_SHARE,
                      min_patients: int = TUNE_MIN_PATIENTS, seed: int = 0) -> np.ndarray:
    """Boolean mask of the rows of ``train_ids`` whose patient is in the tuning subsample."""
    if not 0 < share <= 1:
        raise ValueError(f"the tuning share must lie in (0, 1], got {share}")
    patient = metadata.set_index("image_id")["patient_id"].reindex(train_ids).to_numpy()
    patients = np.unique(patient)
    n = min(len(patients), max(min_patients, round(share * len(patients))))
    chosen = np.random.default_rng(seed).choice(patients, size=n, replace=False)
    return np.isin(patient, chosen)


def default_storage(stack_dir: Path) -> str:
    return f"sqlite:///{(Path(stack_dir) / STUDY_DB_FILE).resolve()}"


def study_name(models: Sequence[str]) -> str:
    """One study per set of level-1 models: their features are the search's input."""
    return "stack__" + "+".join(sorted(models))


def suggest_params(trial: optuna.Trial) -> dict[str, object]:
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.2, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 8, 256, log=True),
        "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 20, 2000, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.1, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.4, 1.0),
        "bagging_freq": 1,
        "lambda_l1": trial.suggest_float("lambda_l1", 1e-8, 10.0, log=True),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-8, 10.0, log=True),
    }


def _default_trial_values() -> dict[str, object]:
    """The untuned defaults as the first trial, so a study never ends worse than no study."""
    keys = ("learning_rate", "num_leaves", "min_data_in_leaf", "feature_fraction", "bagging_fraction", "lambda_l1", "lambda_l2")
    values = {k: DEFAULT_PARAMS[k] for k in keys}
    values["lambda_l1"] = max(float(values["lambda_l1"]), 1e-8)  # inside the log-scaled range
    return values


def _rdb_storage(url: str) -> RDBStorage:
    """The storage with heartbeats: a trial whose process died is failed after the grace period and
    retried once with the same parameters (Optuna >= 4.9 renamed the retry hook)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters:
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            retry = {"heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1)}
        else:
            retry = {"failed_trial_callback": RetryFailedTrialCallback(max_retry=1)}
        return RDBStorage(url, heartbeat_interval=60, grace_period=180, **retry)


def open_study(storage: str, name: str, seed: int = 42) -> optuna.Study:
    rdb = _rdb_storage(storage)
    return optuna.create_study(
        study_name=name,
        storage=rdb,
        direction="minimize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    )


def tune(
    x, y: np.ndarray, folds: np.ndarray, *, trials: int, storage: str, name: str,
    num_threads: int | None = None, num_boost_round: int = NUM_BOOST_ROUND,
    early_stopping_rounds: int | None = EARLY_STOPPING_ROUNDS, progress: bool = True,
) -> tuple[dict[str, object], float, optuna.Study]:
    """Run the study until it holds ``trials`` finished trials; returns (best params, best loss, study)."""
    study = open_study(storage, name)
    if not study.trials:
        study.enqueue_trial(_default_trial_values())

    def objective(trial: optuna.Trial) -> float:
        def report(step: int, running_loss: float) -> None:
            trial.report(running_loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        params = {**FIXED_PARAMS, **suggest_params(trial), "num_threads": num_threads or FIXED_PARAMS["num_threads"]}
        result = cross_validate(x, y, folds, params=params, num_boost_round=num_boost_round,
                                early_stopping_rounds=early_stopping_rounds, on_fold=report, progress=False)
        return result.loss

    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    if finished < trials:
        study.optimize(
            objective,
            n_trials=trials - finished,
            callbacks=[MaxTrialsCallback(trials, states=FINISHED)],  # other workers count too
            gc_after_trial=True,
            show_progress_bar=progress and is_terminal(),  # a log gets optuna's per-trial lines
        )
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RuntimeError(f"study {name!r} has no completed trial yet; run more trials")
    best = study.best_trial
    params = {**FIXED_PARAMS, **best.params, "bagging_freq": 1, "num_threads": num_threads or FIXED_PARAMS["num_threads"]}
    return params, float(best.value), study


def save_best_params(path: Path, params: dict[str, object], loss: float, name: str, models: Sequence[str], n_trials: int,
                     tune_share: float = TUNE_SHARE) -> None:
    """``tune_share``: which patients Optuna saw (patient_subsample), so the report sets them apart."""
    write_json(path, {"params": params, "cv_weighted_log_loss": loss, "study": name, "models": sorted(models),
                      "finished_trials": n_trials, "tune_share": tune_share})


def load_best_params(path: Path) -> dict[str, object] | None:
    """The saved tuned parameters, or None when no study has been run."""
    path = Path(path)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or not isinstance(saved.get("params"), dict):
        raise ValueError(f"{path} is not a best-params file written by `make stack TUNE=1`; delete it to use the defaults")
    return saved
