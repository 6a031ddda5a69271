"""``python -m level1_models <command>``: oof (K-fold training), list (the zoo), bench (images/s),
cache-sizes (the image caches some specs read: ``make prepare`` / ``make cache MODELS=...``), plan (what
a run of several models costs, before it starts).

Under ``torchrun --nproc_per_node=N -m level1_models oof ...`` each process trains its share of
every batch (DDP); only rank 0 writes files. ``oof --spread folds --gpus N`` instead runs N
independent single-device jobs, one fold each (``level1_models/spread.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from competition.cli import run_main, work_lock
from competition.locks import LockHeldError
from level1_models.config import TrainConfig, build_config, parse_field, parse_sets
from level1_models.finished import is_assembled
from level1_models.registry import get_spec, list_models

# Command-line option -> config field (the Makefile's FOLDS, EPOCHS, IMG_SIZE, BATCH, LIMIT, DEVICE).
OPTION_FIELDS = {"folds": "folds", "epochs": "epochs", "img_size": "img_size", "batch": "batch_size",
                 "limit": "limit", "device": "device", "workers": "workers"}


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a zoo name (python -m level1_models list)")
    p.add_argument("--work", type=Path, default=None, help="work folder (default work/<basename of DATA>)")
    p.add_argument("--folds", default=None, help="folds to run, e.g. 0,1 (default: every fold)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None,
                   help="batch per GPU (process); the lr follows the spec's rule from the batch it was set for")
    p.add_argument("--limit", type=int, default=None, help="at most N training images per fold")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec or run field, e.g. --set lr=3e-4 --set compile=true, or one augmentation "
                        "field: --set aug.rotate=30 (repeatable)")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for option, field in OPTION_FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            out[field] = parse_field(field, value) if isinstance(value, str) and field == "folds" else value
    out.update(parse_sets(args.sets))
    return out


def refuse_if_every_fold_is_held(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """FOLDS=k while another run trains fold k: its one-line "another run holds ..." before torch is
    imported (run_oof decides again, holding the locks, fold by fold)."""
    if not cfg.folds:
        return
    errors = []
    for fold in cfg.folds:
        try:
            with work_lock(args, f"oof-{cfg.name}-fold{fold}"):
                pass
        except LockHeldError as exc:
            errors.append(exc)
    if len(errors) == len(cfg.folds):
        raise errors[0]


def cmd_oof(args: argparse.Namespace) -> None:
    overrides = overrides_from(args)
    cfg = build_config(args.model, overrides)  # an unknown name or field fails here, before torch is imported
    if args.spread is not None:
        from level1_models.spread import spread_folds

        if spread_folds(args, cfg):
            return  # the jobs trained every fold and the last one assembled the model
    # No model-wide lock: each fold is trained under its own and the shared files under a short one
    # (level1_models/fold_locks.py), so runs on different folds of one model go at once.
    refuse_if_every_fold_is_held(args, cfg)
    if is_assembled(cfg, args.data, args.work):
        print(f"{cfg.name}: every fold finished earlier and oof.parquet / test.parquet are up to date "
              f"(nothing they are made from changed); kept")
        return
    from level1_models.train import run_model

    try:
        run_model(args.model, args.data, args.work, overrides)
    finally:
        from level1_models.distributed import shutdown

        shutdown()


def cmd_list(args: argparse.Namespace) -> None:
    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}; all: {', '.join(list_models())}", file=sys.stderr)
        return
    for name in names:
        spec = get_spec(name)
        if args.cpu and not spec.cpu_friendly:
            continue
        print(f"{name:<22} {spec.arch:<36} {spec.combination:<10} {spec.img_size:>4} px  batch {spec.batch_size:<3} "
              f"{spec.epochs} ep  {spec.description}")


def cmd_bench(args: argparse.Namespace) -> None:
    from competition.paths import WorkPaths
    from level1_models.bench import print_bench, run_bench
    from level1_models.config import build_config
    from level1_models.data import load_inputs
    from level1_models.train import setup_runtime

    cfg, rt = setup_runtime(build_config(args.model, overrides_from(args)))
    inputs = None
    if args.data is not None:
        inputs = load_inputs(args.data, WorkPaths.for_data(args.data, args.work), cfg.combination, cfg.img_size,
                             model=cfg.name, augment_config=cfg.aug)
    print_bench(cfg, rt, run_bench(cfg, rt, inputs, steps=args.steps, warmup=args.warmup))


def cmd_cache_sizes(args: argparse.Namespace) -> None:
    from level1_models.caches import REAL_SLICES, cache_bytes, needed_cache_sizes

    names = [n for word in args.models for n in word.split(",") if n]
    if not names:
        raise ValueError("name at least one model (python -m level1_models list)")
    needed = needed_cache_sizes(names)  # an unknown name fails here, with the close names
    for size, models in sorted(needed.items()):
        print(f"cache {size} px (about {cache_bytes(size) / 1e9:.0f} GB for the real {REAL_SLICES:,} slices): "
              f"{', '.join(models)}", file=sys.stderr)
    print(" ".join(str(size) for size in sorted(needed)))


def cmd_plan(args: argparse.Namespace) -> None:
    from level1_models.plan import format_plan, make_plan, resolve_counts, split_names

    plan = make_plan(split_names(args.models), overrides_from(args), resolve_counts(args), gpus=args.gpus)
    print(format_plan(plan))
    if args.json is not None:
        args.json.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        print(f"plan: written to {args.json}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m level1_models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("oof", help="K-fold training -> OOF + test predictions, checkpoints, metrics, curves")
    p.add_argument("--data", required=True, type=Path, help="competition folder in the Kaggle layout")
    add_run_options(p)
    p.add_argument("--spread", choices=["folds"], default=None,
                   help="folds: one process per device, each training one fold at a time (with --gpus N)")
    p.add_argument("--gpus", type=int, default=None, help="with --spread folds: the devices (0..N-1) to spread over")
    p.set_defaults(func=cmd_oof)

    p = sub.add_parser("list", help="the registered models (fnmatch PATTERN, like timm.list_models)")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--cpu", action="store_true", help="only the specs small enough for a CPU")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("bench", help="training / inference images/s and the share of time waiting for data")
    p.add_argument("--data", type=Path, default=None, help="prepared dataset (omit: random tensors only)")
    add_run_options(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps per figure")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("cache-sizes", help="the image cache sizes (px) that MODELS read, one line on stdout; "
                                           "which models read each, on stderr")
    p.add_argument("models", nargs="+", help="zoo names, separated by spaces or commas")
    p.set_defaults(func=cmd_cache_sizes)

    from level1_models.plan import RECOMMENDED, TEST_IMAGES, TRAIN_IMAGES

    p = sub.add_parser("plan", help="before a run: caches, FLOPs/image, GPU-hours, embeddings, wall time on N GPUs")
    p.add_argument("--models", default=None,
                   help=f"zoo names, comma or space separated (default: {' '.join(RECOMMENDED)})")
    p.add_argument("--gpus", type=int, default=1, help="GPUs, each running one fold at a time")
    p.add_argument("--n-folds", type=int, default=None, help="folds (default 5, or those of --data)")
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    p.add_argument("--test-images", type=int, default=TEST_IMAGES)
    p.add_argument("--data", type=Path, default=None, help="count images and folds from this prepared dataset")
    p.add_argument("--work", type=Path, default=None, help="its work folder (default work/<basename of DATA>)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="batch size per GPU")
    p.add_argument("--limit", type=int, default=None, help="at most N training images per fold")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec field of every model (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the plan as JSON to this file")
    p.set_defaults(func=cmd_plan, folds=None, device=None, workers=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="level1_models"))
