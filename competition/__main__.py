"""`python -m competition <command>`: download, metadata, labels, folds, prepare, bench."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

from competition.atomic import write_parquet
from competition.cli import add_data_args, run_main, work_paths
from competition.constants import LABELS
from competition.locks import stage_lock


def cmd_download(args: argparse.Namespace) -> None:
    from competition.download import download_competition

    out = download_competition(args.data, keep_zip=not args.delete_zip)
    print(f"competition data in {out}")


def cmd_metadata(args: argparse.Namespace) -> pd.DataFrame:
    from competition.metadata import build_metadata

    paths = work_paths(args)
    table = build_metadata(args.data, paths.metadata, workers=args.workers, bad_files_csv=paths.bad_files)
    splits = table["split"].value_counts().to_dict()
    print(f"wrote {paths.metadata}: {len(table)} images ({splits}), {table['series_id'].nunique()} series, "
          f"{table['patient_id'].nunique()} patients")
    return table


def cmd_labels(args: argparse.Namespace) -> pd.DataFrame:
    from competition.labels import read_labels
    from competition.layout import Layout

    paths = work_paths(args)
    layout = Layout.find(args.data)
    layout.require("train_csv")
    labels = read_labels(layout.train_csv)
    write_parquet(paths.labels, labels)
    rates = ", ".join(f"{c} {labels[c].mean():.3f}" for c in LABELS)
    print(f"wrote {paths.labels}: {len(labels)} labelled images; positive rates: {rates}")
    return labels


def cmd_folds(args: argparse.Namespace) -> None:
    from competition.folds import make_folds

    paths = work_paths(args)
    for needed, command in ((paths.metadata, "metadata"), (paths.labels, "labels")):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} missing; run `python -m competition {command} --data {args.data}` first")
    if paths.folds.is_file() and not args.force:
        # Written once: every model must see the same folds. --force rewrites (and invalidates OOFs).
        print(f"kept {paths.folds} (folds are written once; --force rewrites them)")
        return
    metadata, labels = pd.read_parquet(paths.metadata), pd.read_parquet(paths.labels)
    missing = sorted(set(labels["image_id"]) - set(metadata["image_id"]))
    if missing:
        print(f"warning: {len(missing)} labelled images have no readable DICOM and are left out of the folds "
              f"(first: {missing[0]}); see {paths.bad_files}", file=sys.stderr)
    folds = make_folds(metadata, labels, n_folds=args.n_folds, seed=args.seed)
    write_parquet(paths.folds, folds)
    sizes = folds["fold"].value_counts().sort_index().tolist()
    print(f"wrote {paths.folds}: {args.n_folds} folds over {folds['patient_id'].nunique()} patients, images per fold {sizes}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from competition.layout import Layout

    cmd_metadata(args)
    if not Layout.find(args.data).train_csv.is_file():
        print(f"{args.data} has no train label CSV (a test-only dataset): labels and folds skipped")
        return
    cmd_labels(args)
    cmd_folds(args)


def cmd_bench(args: argparse.Namespace) -> None:
    """Header-pass rate on up to N files, one worker (per core) and all workers."""
    import tempfile

    from competition.layout import Layout
    from competition.metadata import list_images, read_headers

    layout = Layout.find(args.data)
    files = list_images(layout)["path"].tolist()[: args.n]
    wall, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        read_headers(str(layout.root), files)
        wall.append(len(files) / (time.perf_counter() - t0))
        cpu.append(len(files) / (time.process_time() - c0))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"metadata_files: {len(files)} files")
    # Per core = per CPU-second of this process: meaningful on a busy machine, where wall rates are not.
    print(f"metadata_headers_per_s_per_core: {median(cpu):.0f} headers/s")
    print(f"metadata_headers_per_s_one_process_wall: {median(wall):.0f} headers/s")
    print(f"metadata_load_average: {os.getloadavg()[0]:.1f}")
    from competition.metadata import build_metadata

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_metadata(args.data, Path(tmp) / "m.parquet", workers=args.workers, progress=False)
        rate = len(list_images(layout)) / (time.perf_counter() - t0)
    print(f"metadata_build_headers_per_s_{args.workers}_workers: {rate:.0f} headers/s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m competition", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="kaggle competitions download + safe unzip into DATA")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--delete-zip", action="store_true", help="delete the zip once unzipped")
    p.set_defaults(func=cmd_download)

    for name, func, text in (
        ("metadata", cmd_metadata, "header-only pass over every DICOM -> metadata.parquet"),
        ("labels", cmd_labels, "long label CSV -> labels.parquet (one row per image)"),
        ("folds", cmd_folds, "patient-grouped stratified folds -> folds.parquet"),
        ("prepare", cmd_prepare, "metadata, labels and folds"),
    ):
        p = sub.add_parser(name, help=text)
        add_data_args(p)
        p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for the DICOM pass")
        p.add_argument("--n-folds", type=int, default=5)
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--force", action="store_true", help="rewrite the folds table")
        p.set_defaults(func=func)

    p = sub.add_parser("bench", help="metadata pass rate (headers/s)")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.set_defaults(func=cmd_bench)
    return parser


PREPARE_COMMANDS = ("metadata", "labels", "folds", "prepare")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in PREPARE_COMMANDS:  # one run at a time writes a work folder's tables
        with stage_lock(work_paths(args).root, "prepare"):
            args.func(args)
    else:
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="competition"))
