"""``python -m prediction predict --study DIR|dicomweb://... [--data DATA --work WORK | --bundle FILE] [--models a,b] [--out OUT]``
and ``python -m prediction export [--data DATA --work WORK] [--models a,b] [--out FILE]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from competition.cli import run_main
from competition.paths import WorkPaths


def _models(text: str | None) -> list[str] | None:
    return [m for m in text.split(",") if m.strip()] if text else None


def study_arg(text: str) -> Path | str:
    """A folder as a Path; a dicomweb:// URL kept as text (a Path would fold its //)."""
    from prediction.dicomweb import WebLocation, is_dicomweb

    if is_dicomweb(text):
        try:
            WebLocation.parse(text, study=True)  # a malformed URL: argparse's one-line error, at once
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return Path(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prediction", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="per-slice and per-study calls for the CT series in a folder, with a report")
    p.add_argument("--study", required=True, type=study_arg,
                   help="folder of DICOM files (searched recursively), or dicomweb://HOST:PORT/PATH/studies/UID "
                        "(dicomwebs:// for HTTPS; credentials: DICOMWEB_TOKEN or DICOMWEB_USER/DICOMWEB_PASSWORD)")
    p.add_argument("--data", type=Path, help="competition folder the models were trained on (finds the work folder)")
    p.add_argument("--work", type=Path, help="work folder (default work/<basename of DATA>)")
    p.add_argument("--bundle", type=Path, help="an archive written by `make export` (instead of DATA/WORK)")
    p.add_argument("--models", help="comma list of level-1 models (default: every trained one)")
    p.add_argument("--out", type=Path, help="output folder (default <work>/predict/<basename of STUDY>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--batch", type=int, default=64, help="slices per forward pass")
    p.add_argument("--top", type=int, default=3, help="slices per series explained in the report")
    p.add_argument("--no-report", action="store_true", help="write the tables only")
    p.add_argument("--dicom", action="store_true",
                   help="also DICOM results under OUT/dicom/<study>: an SR of the probabilities and Grad-CAM images")
    e = sub.add_parser("export", help="one archive of everything predict needs (checkpoints, configs, threshold, hashes)")
    e.add_argument("--data", type=Path)
    e.add_argument("--work", type=Path)
    e.add_argument("--models", help="comma list of level-1 models (default: every trained one)")
    e.add_argument("--out", type=Path, help="archive path (default <work>/export/<work name>-bundle.tar)")
    args = parser.parse_args(argv)
    if args.command == "predict" and args.bundle is None and args.data is None and args.work is None:
        parser.error("predict needs --data/--work (a trained work folder) or --bundle (an exported archive)")
    if args.command == "export" and args.data is None and args.work is None:
        parser.error("export needs --data or --work")
    return args


def work_paths(args: argparse.Namespace) -> WorkPaths:
    return WorkPaths.for_data(args.data or ".", args.work)


def predict(args: argparse.Namespace) -> int:
    from prediction.run import predict_folder

    out = predict_folder(args.study, work=None if args.bundle else work_paths(args), bundle=args.bundle,
                         models=_models(args.models), out=args.out, device=args.device, batch_size=args.batch,
                         top=args.top, report=not args.no_report, dicom=args.dicom)
    print(out)
    return 0


def export(args: argparse.Namespace) -> int:
    from prediction.bundle import export_bundle

    paths = work_paths(args)
    out = args.out or paths.root / "export" / f"{paths.root.resolve().name}-bundle.tar"
    print(export_bundle(paths, out, _models(args.models)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return predict(args) if args.command == "predict" else export(args)


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m prediction"))
