"""Benchmark of level 2 on a fabricated table of the real size (or --rows, then scaled up).

    python -m level2_stacking.bench [--rows 752803] [--models 5] [--embedding-dim 256] [--threads N]

Prints one line per figure, ``name: value unit``: the feature build (train + one test table per
fold model) and the process's peak memory, one LightGBM cross-validation per thread count
(1, 2, 4, ... up to the usable cores or --threads: binning and time per round), the sequence model's time per epoch, the
blend, and the estimate of a full `make stack` (no tuning) at the real size on 16 cores by
the rule printed beside it. Figures taken on fewer rows are scaled linearly to 752,803 rows
(feature build, memory of the tables, boosting round and epoch all grow linearly in rows).
"""
from __future__ import annotations

import argparse
import resource
import time

import lightgbm as lgb
import numpy as np

from competition.constants import LABELS
from features.tabular import TabularFeatureConfig, build_tabular_features
from level2_stacking.blend import blend, fit_blend_weights
from level2_stacking.lgbm import DEFAULT_PARAMS, default_threads
from level2_stacking.sequence import SequenceSettings, fit_series_model
from level2_stacking.synthetic import fabricate_competition, fabricate_predictions

REAL_TRAIN_ROWS, REAL_TEST_ROWS, N_FOLDS = 752_803, 121_232, 5
# The rule for the one-hour target: rounds per LightGBM model (inner fit + refit) and the
# parallel efficiency assumed from the last measured thread count up to 16 cores.
ASSUMED_ROUNDS, ASSUMED_EFFICIENCY, SEQ_EPOCHS = 600, 0.6, SequenceSettings.epochs


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _thread_counts(limit: int) -> list[int]:
    counts, t = [], 1
    while t < limit:
        counts.append(t)
        t *= 2
    return [*counts, limit]


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
    scale = REAL_TRAIN_ROWS / args.rows
    slices = (20, 44)
    n_test = round(args.rows * REAL_TEST_ROWS / REAL_TRAIN_ROWS)
    per_patient = sum(slices) / 2
    comp = fabricate_competition(n_patients=max(N_FOLDS, round(args.rows / per_patient)),
                                 n_test_patients=max(1, round(n_test / per_patient)), slices=slices, seed=0)
    train_ids = set(comp.folds["image_id"])
    is_train = comp.labels["image_id"].isin(train_ids).to_numpy()
    preds = {f"m{i}": fabricate_predictions(comp.labels, 1.5, seed=i) for i in range(args.models)}
    config = TabularFeatureConfig(k_neighbours=args.neighbours)

    start = time.perf_counter()
    x = build_tabular_features({m: p.loc[is_train] for m, p in preds.items()}, comp.metadata, config)
    x_test = {k: build_tabular_features({m: p.loc[~is_train] for m, p in preds.items()}, comp.metadata, config)
              for k in range(N_FOLDS)}  # one table per fold model, as the stack builds them
    feature_s = time.perf_counter() - start
    n = len(x)
    print(f"bench_rows: {n} train + {len(x_test[0])} test rows, {x.shape[1] - 1} features, {args.models} models")
    print(f"features_seconds: {feature_s:.1f} s (x{scale:.2f} rows -> {feature_s * scale:.0f} s at the real size)")
    tables_gb = (x.memory_usage().sum() + sum(t.memory_usage().sum() for t in x_test.values())) / 2**30
    print(f"features_memory: {tables_gb:.2f} GB (-> {tables_gb * scale:.1f} GB at the real size)")

    y = comp.labels.set_index("image_id").loc[x["image_id"], list(LABELS)].to_numpy(np.float64)
    xm = x.drop(columns="image_id").to_numpy(np.float32)
    del x, x_test
    train_rows = round(len(xm) * (N_FOLDS - 1) / N_FOLDS)  # one fold's training rows
    round_s, bin_s = {}, {}
    for threads in _thread_counts(args.threads):
        params = {**DEFAULT_PARAMS, "num_threads": threads}
        start = time.perf_counter()
        data = lgb.Dataset(xm[:train_rows], label=y[:train_rows, -1], params=params).construct()
        bin_s[threads] = time.perf_counter() - start
        start = time.perf_counter()
        lgb.train(params, data, num_boost_round=args.rounds)
        round_s[threads] = (time.perf_counter() - start) / args.rounds
        print(f"lgbm_threads_{threads}: binning {bin_s[threads]:.1f} s, {round_s[threads] * 1000:.0f} ms per round "
              f"({train_rows} rows; -> {round_s[threads] * scale:.2f} s per round at the real size)")
    print(f"peak_memory: {_peak_gb():.2f} GB (features, matrices and LightGBM)")
    oof = np.clip(y * 0.6 + 0.2, 0, 1)

    seq_n = min(args.seq_rows, n)
    width = len(LABELS) * args.models + 1 + args.embedding_dim * args.models
    data = np.random.default_rng(0).normal(size=(seq_n, width)).astype(np.float16)
    bounds = np.r_[np.arange(0, seq_n, int(per_patient)), seq_n]
    s = SequenceSettings(epochs=1, threads=args.threads)
    start = time.perf_counter()
    fit_series_model(data, y[:seq_n], bounds, np.arange(len(bounds) - 1), args.models, [args.embedding_dim] * args.models, s)
    epoch_s = (time.perf_counter() - start) * REAL_TRAIN_ROWS * (N_FOLDS - 1) / N_FOLDS / seq_n
    print(f"sequence_epoch_seconds: {epoch_s:.0f} s per epoch of a fold at the real size "
          f"(CPU, {args.threads} threads; measured on {seq_n} slices x {width} inputs, scaled)")

    start = time.perf_counter()
    w = fit_blend_weights(y, oof, np.full_like(oof, 0.1))
    blend(oof, oof, w)
    print(f"blend_seconds: {time.perf_counter() - start:.2f} s ({n} rows)")

    top = min(round_s, key=lambda t: t * round_s[t])  # the fewest CPU-seconds per round (a busy box favours 1)
    speed = top / 16 / ASSUMED_EFFICIENCY
    lgbm_16 = (round_s[top] * ASSUMED_ROUNDS * len(LABELS) + 3 * bin_s[top]) * scale * N_FOLDS * speed
    print(f"stack_estimate_16_cores_lgbm: {lgbm_16 / 60:.0f} min (rule: per fold 3 binnings (inner fit, stop, refit) "
          f"+ {ASSUMED_ROUNDS} rounds (inner fit + refit) x 6 labels, at the {top}-thread times (fewest CPU-seconds) scaled "
          f"linearly to the real rows, x {N_FOLDS} folds x {top}/16 threads / {ASSUMED_EFFICIENCY} parallel efficiency)")
    seq_16 = epoch_s * SEQ_EPOCHS * N_FOLDS * args.threads / 16 / ASSUMED_EFFICIENCY
    print(f"stack_estimate_16_cores_sequence_cpu: {seq_16 / 60:.0f} min ({SEQ_EPOCHS} epochs x {N_FOLDS} folds on CPU, "
          f"same thread rule; a GPU takes it off the CPU)")
    print(f"stack_estimate_16_cores_features: {feature_s * scale / 60:.1f} min (single-threaded)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
