"""Benchmark of the level-2 feature builder on a fabricated table.

    python -m level2_stacking.bench [--rows 200000] [--models 2] [--neighbours 5]

Prints one line per figure, ``name: value unit``.
"""
from __future__ import annotations

import argparse
import time


from features.tabular import TabularFeatureConfig, build_tabular_features
from level2_stacking.synthetic import fabricate_competition, fabricate_predictions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m level2_stacking.bench", description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000, help="about this many slices")
    ap.add_argument("--models", type=int, default=2, help="level-1 models")
    ap.add_argument("--neighbours", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = ap.parse_args(argv)

    slices = (16, 48)
    patients = max(2, round(args.rows / (sum(slices) / 2)))
    comp = fabricate_competition(n_patients=patients, n_test_patients=0, slices=slices, seed=0)
    preds = {f"m{i}": fabricate_predictions(comp.labels, 1.5, seed=i) for i in range(args.models)}
    config = TabularFeatureConfig(k_neighbours=args.neighbours)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        table = build_tabular_features(preds, comp.metadata, config)
        best = min(best, time.perf_counter() - start)
    rows = len(table)
    print(f"features_rows: {rows} rows")
    print(f"features_columns: {table.shape[1] - 1} columns")
    print(f"features_seconds: {best:.2f} s")
    print(f"features_rows_per_s: {rows / best:.0f} rows/s")
    print(f"features_memory: {table.memory_usage(deep=False).sum() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
