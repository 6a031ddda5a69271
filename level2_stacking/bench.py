"""Benchmark of level 2 on a fabricated work folder of the real size (or --rows, then scaled up).

    python -m level2_stacking.bench [--rows 752803] [--models 5] [--embedding-dim 256] [--threads N]

Runs the stack's own code on a fabricated folder (five level-1 models with per-fold test
predictions) and prints one line per figure, ``name: value unit``: the stack frame's build (train
features + one test table per fold model), LightGBM binning and time per round per thread count
(1, 2, 4, ... up to the usable cores or --threads), one cross-validation as `make stack` runs it
(inner early stopping + refit, --rounds at most), the sequence model's inputs and time per
epoch, the blend, the peak memory, and the estimate of a full `make stack` (no tuning) at the
real size on 16 cores by the rule printed beside it.

Scaling rule for --rows below the real 752,803: times and memory above the start-up baseline
grow linearly in rows (every table and every histogram pass is linear in rows; LightGBM's
binning sample, at most 200k rows at the real size, is shrunk in the same proportion).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np

from competition.paths import WorkPaths
from features.tabular import TabularFeatureConfig
from level2_stacking.blend import blend, fit_blend_weights
from level2_stacking.frame import build_stack_frame
from level2_stacking.lgbm import DEFAULT_PARAMS, cross_validate, default_threads
from level2_stacking.sequence import SequenceSettings, fit_series_model
from level2_stacking.synthetic import fabricate_competition, write_fabricated_work

REAL_TRAIN_ROWS, REAL_TEST_ROWS, N_FOLDS = 752_803, 121_232, 5
# The rule for the one-hour target: boosting rounds per LightGBM model (inner fit + refit; the
# default learning rate 0.05 early-stops at a few hundred), and the parallel efficiency assumed
# from the measured thread count up to 16 cores.
ASSUMED_ROUNDS, ASSUMED_EFFICIENCY, SEQ_EPOCHS = 600, 0.6, SequenceSettings.epochs


def _rss_gb() -> float:
    """Peak resident memory since the last _reset_peak (Linux VmHWM), else since the start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _reset_peak() -> None:
    """Start a new peak-memory measurement (Linux >= 4.0; elsewhere peaks accumulate)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _thread_counts(limit: int) -> list[int]:
    counts, t = [], 1
    while t < limit:
        counts.append(t)
        t *= 2
    return [*counts, limit]


def _fabricate(root: Path, rows: int, models: int) -> WorkPaths:
    slices = (20, 44)
    per_patient = sum(slices) / 2
    n_test = rows * REAL_TEST_ROWS / REAL_TRAIN_ROWS
    comp = fabricate_competition(n_patients=max(N_FOLDS, round(rows / per_patient)),
                                 n_test_patients=max(1, round(n_test / per_patient)), slices=slices, seed=0)
    paths = WorkPaths(root / "work")
    write_fabricated_work(paths, comp, {f"m{i}": 1.5 + 0.2 * i for i in range(models)}, seed=0)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m level2_stacking.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=REAL_TRAIN_ROWS, help="train slices (test: the real share of it)")
    ap.add_argument("--models", type=int, default=5, help="level-1 models")
    ap.add_argument("--neighbours", type=int, default=5)
    ap.add_argument("--embedding-dim", type=int, default=256, help="embedding dims per model after reduction")
    ap.add_argument("--threads", type=int, default=default_threads(), help="most LightGBM threads to time")
    ap.add_argument("--rounds", type=int, default=20, help="boosting rounds timed per thread count")
    ap.add_argument("--seq-rows", type=int, default=50_000, help="train slices in the timed sequence epoch")
    args = ap.parse_args(argv)
    baseline = _rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _fabricate(Path(tmp), args.rows, args.models)
        start = time.perf_counter()
        frame = build_stack_frame(paths, None, TabularFeatureConfig(k_neighbours=args.neighbours))
        feature_s = time.perf_counter() - start
    n = len(frame.train_ids)
    scale = REAL_TRAIN_ROWS / n
    print(f"bench_rows: {n} train + {len(frame.test_ids)} test rows, {frame.x_train.shape[1]} features, "
          f"{args.models} models (x{scale:.2f} to the real size)")
    print(f"features_seconds: {feature_s:.1f} s (-> {feature_s * scale:.0f} s at the real size)")
    print(f"features_peak_memory: {_rss_gb():.2f} GB (start-up {baseline:.2f} GB; -> "
          f"{baseline + (_rss_gb() - baseline) * scale:.1f} GB at the real size)")

    xm = frame.x_train.to_numpy(np.float32)  # a view of the frame's table, no copy
    train_rows = round(n * (N_FOLDS - 1) / N_FOLDS)  # one fold's training rows
    # LightGBM bins from a sample of at most 200k rows (12 bytes per value while binning): below the
    # real size the sample shrinks in proportion, so that memory and binning time scale linearly.
    sample = {"bin_construct_sample_cnt": max(1000, round(200_000 * n / REAL_TRAIN_ROWS))}
    round_s, bin_s = {}, {}
    for threads in _thread_counts(args.threads):
        params = {**DEFAULT_PARAMS, **sample, "num_threads": threads}
        start = time.perf_counter()
        data = lgb.Dataset(xm[:train_rows], label=frame.y[:train_rows, -1], params=params).construct()
        bin_s[threads] = time.perf_counter() - start
        start = time.perf_counter()
        lgb.train(params, data, num_boost_round=args.rounds)
        round_s[threads] = (time.perf_counter() - start) / args.rounds
        print(f"lgbm_threads_{threads}: binning {bin_s[threads]:.1f} s, {round_s[threads] * 1000:.0f} ms per round "
              f"({train_rows} rows; -> {round_s[threads] * scale:.2f} s per round at the real size)")
    del xm, data
    top = min(round_s, key=lambda t: t * round_s[t])  # the fewest CPU-seconds per round (a busy box favours 1)
    _reset_peak()
    start = time.perf_counter()
    result = cross_validate(frame.x_train, frame.y, frame.folds, frame.x_test,
                            params={**DEFAULT_PARAMS, **sample, "num_threads": top}, num_boost_round=args.rounds,
                            early_stopping_rounds=args.rounds, progress=False)
    print(f"lgbm_cv_seconds: {time.perf_counter() - start:.1f} s ({top} threads, at most {args.rounds} rounds: "
          f"inner fit + early stopping + refit, 6 labels x {N_FOLDS} folds, per-fold test tables)")
    print(f"lgbm_cv_peak_memory: {_rss_gb():.2f} GB (-> {baseline + (_rss_gb() - baseline) * scale:.1f} GB at the real size)")

    seq_n = min(args.seq_rows, n)
    width = 6 * args.models + 1 + args.embedding_dim * args.models
    inputs = np.random.default_rng(0).normal(size=(seq_n, width)).astype(np.float16)
    print(f"sequence_inputs_memory: {inputs.nbytes * (1 + REAL_TEST_ROWS * N_FOLDS / REAL_TRAIN_ROWS) / seq_n * REAL_TRAIN_ROWS / 2**30:.1f} GB "
          f"at the real size (float16, {width} inputs per slice: train + one test table per fold model)")
    bounds = np.r_[np.arange(0, seq_n, 32), seq_n]
    s = SequenceSettings(epochs=1, threads=args.threads)
    start = time.perf_counter()
    fit_series_model(inputs, frame.y[:seq_n], bounds, np.arange(len(bounds) - 1), args.models,
                     [args.embedding_dim] * args.models, s)
    epoch_s = (time.perf_counter() - start) * REAL_TRAIN_ROWS * (N_FOLDS - 1) / N_FOLDS / seq_n
    print(f"sequence_epoch_seconds: {epoch_s:.0f} s per epoch of a fold at the real size "
          f"(CPU, {args.threads} threads; measured on {seq_n} slices, scaled)")

    start = time.perf_counter()
    other = np.clip(result.oof * 0.5 + 0.1, 0, 1)
    blend(result.oof, other, fit_blend_weights(frame.y, result.oof, other))
    print(f"blend_seconds: {time.perf_counter() - start:.2f} s ({n} rows)")

    speed = top / 16 / ASSUMED_EFFICIENCY
    lgbm_16 = (round_s[top] * ASSUMED_ROUNDS * 6 + 3 * bin_s[top]) * scale * N_FOLDS * speed
    print(f"stack_estimate_16_cores_lgbm: {lgbm_16 / 60:.0f} min (rule: per fold 3 binnings (inner fit, stop, refit) "
          f"+ {ASSUMED_ROUNDS} rounds (inner fit + refit) x 6 labels, at the {top}-thread times (fewest CPU-seconds) "
          f"scaled linearly to the real rows, x {N_FOLDS} folds x {top}/16 threads / {ASSUMED_EFFICIENCY} efficiency)")
    seq_16 = epoch_s * SEQ_EPOCHS * N_FOLDS * args.threads / 16 / ASSUMED_EFFICIENCY
    print(f"stack_estimate_16_cores_sequence_cpu: {seq_16 / 60:.0f} min ({SEQ_EPOCHS} epochs x {N_FOLDS} folds on CPU, "
          f"same thread rule; on a GPU (DEVICE=cuda, the default when one is present) it leaves the CPU)")
    print(f"stack_estimate_16_cores_features: {feature_s * scale / 60:.1f} min (single-threaded)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
