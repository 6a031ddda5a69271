"""python -m rehearsal run --scale 1.0 [--dir DIR] [--workers N] [--limit N] [--stack-opts "..."]
python -m rehearsal generate --out DATA --scale S [--size 64] [--workers N]
python -m rehearsal fabricate --data DATA --work WORK
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rehearsal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="every stage at SCALE x the real counts, measured")
    r.add_argument("--scale", type=float, default=1.0, help="share of the real 752,803 + 121,232 images (1.0)")
    r.add_argument("--dir", type=Path, default=None, help="rehearsal folder (default work/rehearsal-<scale>)")
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of the parallel stages")
    r.add_argument("--limit", type=int, default=2000, help="training images of the real tiny CNN (fold 0, 1 epoch)")
    r.add_argument("--stack-opts", default=None,
                   help="options of `python -m level2_stacking` (default: rehearsal.run.STACK_OPTS, fewer rounds "
                        "and epochs than make stack's defaults; the summary scales their times to the defaults)")
    g = sub.add_parser("generate", help="the competition alone")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--scale", type=float, default=1.0)
    g.add_argument("--size", type=int, default=64, help="image side in px")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    f = sub.add_parser("fabricate", help="the five recommended models' level-1 outputs, fabricated")
    f.add_argument("--data", type=Path, required=True)
    f.add_argument("--work", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "generate":
        from rehearsal.generate import generate

        config = generate(args.out, args.scale, size=args.size, seed=args.seed, workers=args.workers)
        print(f"wrote {args.out}: {config['train_images']:,} train + {config['test_images']:,} test images, "
              f"{config['series']:,} series, {config['patients']:,} patients, {config['pixels']}")
    elif args.command == "fabricate":
        from competition.paths import WorkPaths
        from rehearsal.level1 import fabricate

        rows = fabricate(args.data, WorkPaths.for_data(args.data, args.work))
        print(f"fabricated 5 level-1 models: {rows:,} prediction rows")
    else:
        from rehearsal.run import STACK_OPTS, run

        root = args.dir or Path("work") / f"rehearsal-{args.scale:g}"
        opts = STACK_OPTS if args.stack_opts is None else args.stack_opts
        run(root, args.scale, workers=args.workers, limit=args.limit, stack_opts=shlex.split(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
