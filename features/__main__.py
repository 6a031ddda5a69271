"""`python -m features <command>`: build the image cache; list the window combinations."""
from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from competition.cli import add_data_args, run_main, work_paths
from competition.locks import stage_lock
from features.slice_codec import CODECS, DEFAULT_CODEC


def cmd_cache(args: argparse.Namespace) -> None:
    from features.cache import build_cache

    paths = work_paths(args)
    if paths.metadata.is_file():
        metadata = pd.read_parquet(paths.metadata)
    else:
        from competition.metadata import build_metadata

        print(f"{paths.metadata} missing: reading the DICOM headers first", file=sys.stderr)
        metadata = build_metadata(args.data, paths.metadata, workers=args.workers, bad_files_csv=paths.bad_files)
    result = build_cache(args.data, metadata, paths.cache, size=args.size, workers=args.workers,
                         progress=not args.no_progress, bad_files_csv=paths.bad_files, codec=args.codec,
                         crop=not args.no_crop)
    print(f"wrote {result['cache_dir']}: {result['cached']} slices at {args.size} px "
          f"({result['written_now']} now, {result['already_done']} already there), "
          f"{result['bytes_per_slice']:.0f} bytes/slice ({result['codec']}), {result['data_bytes'] / 2**20:.1f} MiB on disk")
    if result["bad"]:
        print(f"{result['bad']} bad files skipped; listed in {result['bad_files_csv']} and {paths.bad_files}")
    if result["written_now"]:
        print(f"cache_build: {result['slices_per_s']:.0f} slices/s with {args.workers} workers")


def cmd_windows(args: argparse.Namespace) -> None:
    from features.windows import COMBINATIONS, PRESETS

    for name, window in PRESETS.items():
        print(f"window {name}: center {window.center:g} HU, width {window.width:g} HU")
    for name, comb in sorted(COMBINATIONS.items()):
        channels = ", ".join(c.window + (f"@{c.offset:+d}" if c.offset else "") for c in comb.channels)
        print(f"combination {name}: {len(comb)} channel{'s' if len(comb) > 1 else ''} ({channels}), {comb.transform}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m features", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache", help="one parallel, resumable pass: every DICOM -> its head's square, int16 HU at --size px")
    add_data_args(p)
    p.add_argument("--size", type=int, default=256, help="side of the cached slices in px (256 default, 512 allowed)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading DICOMs (default: every core)")
    p.add_argument("--codec", choices=CODECS, default=DEFAULT_CODEC,
                   help="lossless: lz4 about halves the disk, zstd saves a fifth more but decodes 2x slower; "
                        "raw: int16 as is, the fastest read")
    p.add_argument("--no-crop", action="store_true", help="keep whole slices (padded to squares), not the head's box")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("windows", help="list the window presets and the named combinations")
    p.set_defaults(func=cmd_windows)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "cache":  # one build per size and work folder at a time
        with stage_lock(work_paths(args).root, f"cache-{args.size}px"):
            args.func(args)
    else:
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="features"))
