"""Command line: `python -m competition.synthetic generate|score|sheet ...` (see the package docstring)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from competition.synthetic import MARKER, PRESETS, Knobs, contact_sheet, generate, score_submission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m competition.synthetic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write a synthetic competition in the Kaggle layout")
    gen.add_argument("--out", required=True, help="dataset folder to create")
    gen.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    gen.add_argument("--patients", type=int, default=None, help="number of patients (default: the preset's)")
    gen.add_argument("--size", type=int, default=None, help="image rows = columns (default: the preset's, 256 for demo)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (1: in this process; default: every core)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in fields(Knobs):
        gen.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=None, dest=f.name,
                         help=f"knob (default {f.default})")

    sc = sub.add_parser("score", help="competition metric of a submission against the answers file")
    sc.add_argument("submission", help="long-format submission, .csv or .csv.gz")
    sc.add_argument("answers", help="stage_2_test_answers.csv of the synthetic dataset")

    sh = sub.add_parser("sheet", help="PNG contact sheet of one positive study per subtype (brain window)")
    sh.add_argument("data", help="synthetic dataset folder")
    sh.add_argument("--out", required=True, help="PNG to write")
    sh.add_argument("--columns", type=int, default=7)
    sh.add_argument("--outline", action="store_true", help="draw the bleed masks too")

    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            knobs = {f.name: getattr(args, f.name) for f in fields(Knobs) if getattr(args, f.name) is not None}
            start = time.perf_counter()
            existed = (Path(args.out) / MARKER).is_file()
            out = generate(args.out, preset=args.preset, n_patients=args.patients, size=args.size, seed=args.seed,
                           workers=args.workers, progress=not args.quiet, **knobs)
            if existed:
                print(f"{out} is complete already (same configuration): nothing to do")
            else:
                print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
        elif args.command == "score":
            scores = score_submission(args.submission, args.answers)
            for name, value in scores.items():
                print(f"{name}: {value:.5f}")
        else:
            print(f"wrote {contact_sheet(args.data, args.out, columns=args.columns, outline=args.outline)}")
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
