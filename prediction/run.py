"""``make predict``: a study folder in, slices.csv / studies.csv / skipped.csv / report.html out."""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from competition.atomic import write_json
from competition.paths import WorkPaths
from prediction.ensemble import Ensemble, from_work
from prediction.outputs import study_table, write_tables
from prediction.predictor import Predictor
from prediction.study import read_study


def load_ensemble(work: WorkPaths | None, bundle: Path | None, models: Sequence[str] | None) -> Ensemble:
    if bundle is not None:
        from prediction.bundle import open_bundle

        return open_bundle(bundle, models)
    assert work is not None
    return from_work(work, models)


def default_out(study: Path, work: WorkPaths | None, bundle: Path | None) -> Path:
    root = work.root if work is not None else Path("work") / Path(bundle).name.split(".")[0]
    return root / "predict" / Path(study).resolve().name


def predict_folder(study: Path, work: WorkPaths | None = None, bundle: Path | None = None,
                   models: Sequence[str] | None = None, out: Path | None = None, device: str = "auto",
                   batch_size: int = 64, top: int = 3, report: bool = True) -> Path:
    """Predict every CT series under ``study``; returns the output folder."""
    t0 = time.perf_counter()
    ensemble = load_ensemble(work, bundle, models)
    predictor = Predictor(device, batch_size).load(ensemble)
    scan = read_study(study)
    result = predictor.predict(scan)
    out = Path(out) if out is not None else default_out(study, work, bundle)
    studies = study_table(result.slices, ensemble.threshold, result.studies)
    write_tables(out, result.slices, studies, scan.skipped)
    if report:
        from prediction.report import write_report

        write_report(out / "report.html", result, studies, predictor, top=top)
    write_json(out / "run.json", {
        "study": str(study), "source": ensemble.source, "device": str(predictor.device), "level": result.level,
        **ensemble.to_json(), "n_slices": len(result.slices), "n_skipped": len(scan.skipped),
        "predict_seconds": round(result.seconds, 3), "total_seconds": round(time.perf_counter() - t0, 3),
    })
    print(f"{len(result.slices)} slices of {studies.shape[0]} studies predicted ({result.level}) in "
          f"{result.seconds:.1f} s on {predictor.device}; {len(scan.skipped)} files skipped", file=sys.stderr)
    return out
