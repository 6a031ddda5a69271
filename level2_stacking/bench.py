"""Benchmark of level 2 on a fabricated work folder of the real size (or --rows, then scaled up).

    python -m level2_stacking.bench [--rows 752803] [--models 5] [--embedding-dim 256] [--threads N]
                                    [--rounds 20] [--widths 1024,2048,2048,2048,2048]

Runs the stack's own code on a fabricated folder that looks like level 1's: five models with
float64 probabilities, per-fold test predictions and float16 embeddings of the widths of the
README's recipe (DenseNet-121: 1024; SE-ResNeXt / ResNeXt: 2048), written per fold in each fold
table's own order. Prints one line per figure, ``name: value unit``: the stack frame's build
(train features + one test table per fold model), LightGBM binning and time per round per thread
count (1, 2, 4, ... up to the usable cores or --threads), one cross-validation as `make stack`
runs it (inner early stopping + refit, --rounds at most), the sequence model's inputs (shared
space maps and the float16 table) and one epoch on them, the blend, and the estimate of a full
`make stack` (no tuning) at the real size on 16 cores by the rule printed beside it. Each phase,
in `make stack`'s order, prints ``peak_memory_<phase>``: the process's peak resident memory
during that phase (Linux VmHWM, reset before it), which counts what earlier phases still hold.

Scaling rule for --rows below the real 752,803: times and memory above the baseline (resident
memory after fabrication: imports and the fabricated tables) grow linearly in rows (every table
and every histogram pass is linear in rows; LightGBM's binning sample, at most 200k rows at the
real size, is shrunk in the same proportion).
"""
from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from competition.paths import WorkPaths
from features.tabular import TabularFeatureConfig
from level2_stacking.bench_inputs import write_embeddings
from level2_stacking.blend import choose_blend, nested_blend
from level2_stacking.choices import assemble
from level2_stacking.frame import StackFrame, build_stack_frame
from level2_stacking.lgbm import DEFAULT_PARAMS, cross_validate, default_threads
from level2_stacking.report import LGBM_ROW, SEQ_ROW
from level2_stacking.sequence import SequenceSettings, fit_series_model, predict_series
from level2_stacking.sequence_data import SequenceInputs, build_sequence_inputs
from level2_stacking.synthetic import fabricate_competition, write_fabricated_work

REAL_TRAIN_ROWS, REAL_TEST_ROWS, N_FOLDS = 752_803, 121_232, 5
# Embedding widths of the README's five recipes (rsna1st_densenet121, rsna1st_seresnext101,
# rsna2nd_resnext101_wsl, rsna3rd_seresnext50, rsna11th_seresnext50), as `make plan` counts them.
RECIPE_WIDTHS = (1024, 2048, 2048, 2048, 2048)
# The rule for the one-hour target: boosting rounds per LightGBM model (inner fit + refit; the
# default learning rate 0.05 early-stops at a few hundred), and the parallel efficiency assumed
# from the measured thread count up to 16 cores.
ASSUMED_ROUNDS, ASSUMED_EFFICIENCY, SEQ_EPOCHS = 600, 0.6, SequenceSettings.epochs


def _status_gb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _rss_gb() -> float:
    """Peak resident memory since the last _reset_peak (Linux VmHWM), else since the start."""
    peak = _status_gb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_peak() -> None:
    """Start a new peak-memory measurement (Linux >= 4.0; elsewhere peaks accumulate)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class _Phases:
    """``peak_memory_<phase>`` lines: the peak during each phase, and linearly to the real size."""

    def __init__(self) -> None:
        gc.collect()
        self.scale, self.baseline, self.peaks = 1.0, _status_gb("VmRSS") or _rss_gb(), {}

    def start(self) -> None:
        gc.collect()
        _reset_peak()

    def report(self, phase: str, note: str = "") -> None:
        peak = _rss_gb()
        self.peaks[phase] = self.baseline + (peak - self.baseline) * self.scale
        print(f"peak_memory_{phase}: {peak:.2f} GB (baseline {self.baseline:.2f} GB; -> {self.peaks[phase]:.1f} GB "
              f"at the real size){note}", flush=True)


def _thread_counts(limit: int) -> list[int]:
    counts, t = [], 1
    while t < limit:
        counts.append(t)
        t *= 2
    return [*counts, limit]


def _fabricate(root: Path, rows: int, widths: list[int]) -> WorkPaths:
    paths = WorkPaths(root / "work")
    _fabricate_into(paths, rows, widths)
    return paths


def _fabricate_into(paths: WorkPaths, rows: int, widths: list[int]) -> None:
    """Level 1's outputs: float64 probabilities (parquet) and float16 embeddings (width 0: none)."""
    slices = (20, 44)
    per_patient = sum(slices) / 2
    n_test = rows * REAL_TEST_ROWS / REAL_TRAIN_ROWS
    comp = fabricate_competition(n_patients=max(N_FOLDS, round(rows / per_patient)),
                                 n_test_patients=max(2, round(n_test / per_patient)), slices=slices, seed=0)
    names = [f"m{i}" for i in range(len(widths))]
    write_fabricated_work(paths, comp, {m: 1.5 + 0.2 * i for i, m in enumerate(names)}, seed=0)
    write_embeddings(paths.model_dir(names[0]).parent, comp.labels, {m: w for m, w in zip(names, widths) if w})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m level2_stacking.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=REAL_TRAIN_ROWS, help="train slices (test: the real share of it)")
    ap.add_argument("--models", type=int, default=5, help="level-1 models")
    ap.add_argument("--widths", default=",".join(map(str, RECIPE_WIDTHS)),
                    help="embedding width of each level-1 model, comma-separated, cycled over --models (0: none)")
    ap.add_argument("--neighbours", type=int, default=5)
    ap.add_argument("--embedding-dim", type=int, default=256, help="embedding dims per model after reduction")
    ap.add_argument("--threads", type=int, default=default_threads(), help="most LightGBM threads to time")
    ap.add_argument("--rounds", type=int, default=20, help="boosting rounds timed per thread count")
    ap.add_argument("--seq-rows", type=int, default=50_000, help="train slices in the timed sequence epoch")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the fabricated work folder (default: the system's)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the fabricated work folder here, and reuse it when it exists (--rows, --models, "
                         "--widths must then match what it was made with)")
    ap.add_argument("--skip-lgbm", action="store_true", help="only the frame, the sequence model's phases and the blend")
    args = ap.parse_args(argv)
    listed = [int(w) for w in args.widths.split(",")]
    widths = [listed[i % len(listed)] for i in range(args.models)]
    if args.work is not None:
        paths, done = WorkPaths(args.work), args.work / "fabricated.txt"  # written last: an interrupted one is redone
        if not done.is_file():
            start = time.perf_counter()
            _fabricate_into(paths, args.rows, widths)
            done.write_text(f"rows {args.rows}, widths {widths}\n")
            print(f"fabricate_seconds: {time.perf_counter() - start:.1f} s (embedding widths {widths})", flush=True)
        return _run(args, paths, pd.read_parquet(paths.metadata))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        start = time.perf_counter()
        paths = _fabricate(Path(tmp), args.rows, widths)
        metadata = pd.read_parquet(paths.metadata)
        print(f"fabricate_seconds: {time.perf_counter() - start:.1f} s (embedding widths {widths})", flush=True)
        return _run(args, paths, metadata)


def _run(args: argparse.Namespace, paths: WorkPaths, metadata: pd.DataFrame) -> int:
    phases = _Phases()
    phases.start()
    start = time.perf_counter()
    frame = build_stack_frame(paths, None, TabularFeatureConfig(k_neighbours=args.neighbours))
    feature_s = time.perf_counter() - start
    n = len(frame.train_ids)
    scale = phases.scale = REAL_TRAIN_ROWS / n
    print(f"bench_rows: {n} train + {len(frame.test_ids)} test rows, {frame.x_train.shape[1]} features, "
          f"{args.models} models (x{scale:.2f} to the real size)")
    print(f"features_seconds: {feature_s:.1f} s (-> {feature_s * scale:.0f} s at the real size)")
    x_test_gb = sum(x.memory_usage().sum() for x in frame.x_test.values()) / 2**30
    phases.report("frame", f"; features {frame.x_train.memory_usage().sum() / 2**30:.2f} GB train + "
                           f"{x_test_gb:.2f} GB test tables")

    if args.skip_lgbm:
        result = None
    else:
        round_s, bin_s, sample = _lgbm_threads(args, frame)
        top, result = _lgbm_cv(args, frame, round_s, sample, phases)

    phases.start()
    start = time.perf_counter()
    inputs = build_sequence_inputs(frame, metadata, args.embedding_dim)
    size = (inputs.train.nbytes + sum(t.nbytes for t in inputs.test.values())) / 2**30
    print(f"sequence_inputs_seconds: {time.perf_counter() - start:.1f} s ({inputs.train.shape[1]} {inputs.train.dtype} "
          f"inputs per slice, {size:.2f} GB: train + one test table per fold model; {inputs.note})")
    phases.report("sequence_inputs")
    epoch_s = _sequence_epoch(args, frame, inputs, phases)
    del inputs

    phases.start()
    start = time.perf_counter()
    # make stack's blend: every candidate (LightGBM, a stand-in for the sequence model, each level-1
    # model, their mean), fold k's weights and `any` rule chosen on the other folds, then the final fit.
    first = frame.level1_oof[frame.models[0]] if result is None else result.oof
    other = np.clip(first * 0.5 + 0.1, 0, 1)
    test = frame.level1_test[frame.models[0]] if result is None else result.test
    names, candidates, _ = assemble(frame, {LGBM_ROW: first, SEQ_ROW: other}, {LGBM_ROW: test, SEQ_ROW: test})
    nested_blend(names, frame.y, frame.folds, candidates)
    choose_blend(names, frame.y, candidates)
    print(f"blend_seconds: {time.perf_counter() - start:.2f} s ({n} rows, {len(names)} candidates, nested + final)")
    phases.report("blend")
    worst = max(phases.peaks, key=phases.peaks.get)
    print(f"peak_memory_max: {phases.peaks[worst]:.1f} GB at the real size ({worst}; target < 16 GB)")
    if result is not None:
        _estimates(args, round_s, bin_s, top, scale, epoch_s)
    print(f"stack_estimate_16_cores_features: {feature_s * scale / 60:.1f} min (single-threaded)")
    return 0


def _lgbm_cv(args: argparse.Namespace, frame: StackFrame, round_s: dict[int, float], sample: dict[str, int],
             phases: _Phases):
    """One cross-validation as `make stack` runs it, at the thread count of the fewest CPU-seconds."""
    top = min(round_s, key=lambda t: t * round_s[t])  # a busy box favours 1
    phases.start()
    start = time.perf_counter()
    result = cross_validate(frame.x_train, frame.y, frame.folds, frame.x_test,
                            params={**DEFAULT_PARAMS, **sample, "num_threads": top}, num_boost_round=args.rounds,
                            early_stopping_rounds=args.rounds, progress=False)
    print(f"lgbm_cv_seconds: {time.perf_counter() - start:.1f} s ({top} threads, at most {args.rounds} rounds: "
          f"inner fit + early stopping + refit, 6 labels x {N_FOLDS} folds, per-fold test tables)")
    phases.report("lgbm_cv")
    return top, result


def _estimates(args: argparse.Namespace, round_s: dict[int, float], bin_s: dict[int, float], top: int, scale: float,
               epoch_s: float) -> None:
    speed = top / 16 / ASSUMED_EFFICIENCY
    lgbm_16 = (round_s[top] * ASSUMED_ROUNDS * 6 + 3 * bin_s[top]) * scale * N_FOLDS * speed
    print(f"stack_estimate_16_cores_lgbm: {lgbm_16 / 60:.0f} min (rule: per fold 3 binnings (inner fit, stop, refit) "
          f"+ {ASSUMED_ROUNDS} rounds (inner fit + refit) x 6 labels, at the {top}-thread times (fewest CPU-seconds) "
          f"scaled linearly to the real rows, x {N_FOLDS} folds x {top}/16 threads / {ASSUMED_EFFICIENCY} efficiency)")
    seq_16 = epoch_s * SEQ_EPOCHS * N_FOLDS * args.threads / 16 / ASSUMED_EFFICIENCY
    print(f"stack_estimate_16_cores_sequence_cpu: {seq_16 / 60:.0f} min ({SEQ_EPOCHS} epochs x {N_FOLDS} folds on CPU, "
          f"same thread rule; on a GPU (DEVICE=cuda, the default when one is present) it leaves the CPU)")


def _lgbm_threads(args: argparse.Namespace, frame: StackFrame
                  ) -> tuple[dict[int, float], dict[int, float], dict[str, int]]:
    """Binning seconds and seconds per round of one fold's training rows, per thread count."""
    n = len(frame.train_ids)
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
              f"({train_rows} rows; -> {round_s[threads] * REAL_TRAIN_ROWS / n:.2f} s per round at the real size)",
              flush=True)
    return round_s, bin_s, sample


def _sequence_epoch(args: argparse.Namespace, frame: StackFrame, inputs: SequenceInputs, phases: _Phases) -> float:
    """One epoch on the first --seq-rows train slices of the real inputs (seconds scaled to a fold
    at the real size), with the held-out fold's gathered copy that cross-validation predicts from."""
    phases.start()
    bounds = inputs.train_series
    n_series = max(1, int(np.searchsorted(bounds, min(args.seq_rows, len(frame.train_ids)), "right")) - 1)
    seq_n = int(bounds[n_series])
    s = SequenceSettings(epochs=1, threads=args.threads)
    start = time.perf_counter()
    model = fit_series_model(inputs.train[:seq_n], frame.y[:seq_n], bounds[:n_series + 1], np.arange(n_series),
                             inputs.n_models, inputs.embedding_dims, s)
    epoch_s = (time.perf_counter() - start) * REAL_TRAIN_ROWS * (N_FOLDS - 1) / N_FOLDS / seq_n
    print(f"sequence_epoch_seconds: {epoch_s:.0f} s per epoch of a fold at the real size "
          f"(CPU, {args.threads} threads; measured on {seq_n} slices, scaled)")
    gathered = inputs.train[np.flatnonzero(frame.folds == frame.folds[0])]  # as cross_validate_sequence does
    first = int(bounds[1])
    predict_series(model, inputs.train[:first], np.array([0, first]), s)
    phases.report("sequence_epoch", f"; with a held-out fold's gathered copy, {gathered.nbytes / 2**30:.2f} GB")
    return epoch_s


if __name__ == "__main__":
    raise SystemExit(main())
