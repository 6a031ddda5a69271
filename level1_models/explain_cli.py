"""``make explain``: Grad-CAM, Guided Backprop, DeconvNet and Guided Grad-CAM panels for a trained model.

    python -m level1_models.explain_cli --model NAME --data DATA [--work WORK]
        (--image ID[,ID...] | --top N) [--label any] [--fold K] [--split train|test]
        [--layer DOTTED.NAME] [--device cpu]

Prints the path of every PNG it writes (under ``<work>/reports/explain/<model>/``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from competition.cli import run_main
from competition.constants import LABELS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m level1_models.explain_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a zoo name with a trained model folder")
    p.add_argument("--data", required=True, type=Path, help="competition folder in the Kaggle layout")
    p.add_argument("--work", type=Path, default=None, help="work folder (default work/<basename of DATA>)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", default=None, help="image id(s) to explain, comma-separated")
    which.add_argument("--top", type=int, default=None, help="the N slices with the highest predicted LABEL")
    p.add_argument("--label", default="any", choices=LABELS, help="the output explained (default any)")
    p.add_argument("--fold", type=int, default=None,
                   help="fold model to use (default: a train image's own OOF fold, else the first trained fold)")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="where --top looks: OOF predictions (train) or test predictions")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (dotted module name; default: found from the model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when there is a GPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from level1_models.explain import explain_images

    args = parse_args(argv)
    image_ids = [i.strip() for i in args.image.split(",") if i.strip()] if args.image is not None else None
    if image_ids is not None and not image_ids:
        raise ValueError("--image is empty; give an image id such as ID_0a1b2c3d4")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    written = explain_images(
        args.model, args.data, args.work, image_ids=image_ids, top=args.top, label=args.label,
        fold=args.fold, split=args.split, layer=args.layer, device=device,
    )
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="explain"))
