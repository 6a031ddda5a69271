"""``make predict``: a study folder in, slices.csv / studies.csv / skipped.csv / report.html out."""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from competition.atomic import write_json
from competition.badfiles import summary_lines
from competition.paths import WorkPaths
from prediction.ensemble import Ensemble, from_work
from prediction.outputs import study_table, write_tables
from prediction.predictor import Predictor
from prediction.study import Study, read_study


def load_ensemble(work: WorkPaths | None, bundle: Path | None, models: Sequence[str] | None) -> Ensemble:
    if bundle is not None:
        from prediction.bundle import open_bundle

        return open_bundle(bundle, models)
    assert work is not None
    return from_work(work, models)


def default_out(study: Path | str, work: WorkPaths | None, bundle: Path | None) -> Path:
    """<work>/predict/<folder name>, or <work>/predict/<StudyInstanceUID> for a dicomweb:// study."""
    from prediction.dicomweb import WebLocation, is_dicomweb

    root = work.root if work is not None else Path("work") / Path(bundle).name.split(".")[0]
    if is_dicomweb(study):
        from prediction.listener import safe_name

        return root / "predict" / safe_name(str(WebLocation.parse(str(study), study=True).study_uid))
    return root / "predict" / Path(study).resolve().name


def local_folder(study: Path | str, out: Path) -> Path:
    """The folder to read: STUDY itself, or for dicomweb://.../studies/UID the study retrieved by WADO-RS
    into OUT/source (kept beside the results it gave)."""
    from prediction.dicomweb import fetch_study, is_dicomweb

    if not is_dicomweb(study):
        return Path(study)
    folder = fetch_study(str(study), out / "source")
    print(f"retrieved {sum(1 for _ in folder.iterdir())} instances of {study} into {folder}", file=sys.stderr)
    return folder


def print_scan(scan: Study) -> None:
    """One line per reason a file or folder was skipped or read with a caveat (a reason shared by
    many files, such as a series' padding, is one line naming the first few)."""
    for kind, table in (("skipped", scan.skipped), ("warning", scan.warnings)):
        for line in summary_lines(table.itertuples(index=False, name=None)):
            print(f"{kind}: {line}", file=sys.stderr)


def predict_folder(study: Path | str, work: WorkPaths | None = None, bundle: Path | None = None,
                   models: Sequence[str] | None = None, out: Path | None = None, device: str = "auto",
                   batch_size: int = 64, top: int = 3, report: bool = True, dicom: bool = False) -> Path:
    """Predict every CT series under ``study`` (a folder, or a dicomweb:// study URL); returns the output folder."""
    t0 = time.perf_counter()
    out = Path(out) if out is not None else default_out(study, work, bundle)
    scan = read_study(local_folder(study, out))  # before the models load: a wrong STUDY fails in seconds
    print_scan(scan)
    ensemble = load_ensemble(work, bundle, models)
    predictor = Predictor(device, batch_size).load(ensemble)
    result = predictor.predict(scan)
    studies = study_table(result.slices, ensemble.threshold)
    write_tables(out, result.slices, studies, scan.skipped)
    if report:
        from prediction.report import write_report

        write_report(out / "report.html", result, studies, predictor, top=top)
    if dicom:  # the SR and the Grad-CAM series, in the source study (prediction.dicom_outputs)
        from prediction.dicom_outputs import write_dicom_results

        write_dicom_results(out / "dicom", result, studies, predictor, top=top)
    write_json(out / "run.json", {
        "study": str(study), "source": ensemble.source, "device": str(predictor.device), "level": result.level,
        **ensemble.to_json(), "n_slices": len(result.slices), "n_skipped": len(scan.skipped),
        "skipped": scan.skipped.to_dict("records"), "warnings": scan.warnings.to_dict("records"),
        "predict_seconds": round(result.seconds, 3), "total_seconds": round(time.perf_counter() - t0, 3),
    })
    print(f"{len(result.slices)} slices of {studies.shape[0]} studies predicted ({result.level}) in "
          f"{result.seconds:.1f} s on {predictor.device}; {len(scan.skipped)} files skipped", file=sys.stderr)
    return out
