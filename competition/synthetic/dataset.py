"""Writing a whole synthetic competition: images, CSVs, answers, bleed truth, in parallel.

The dataset is built in `<out>.partial/` and renamed to `<out>` once complete, with the marker
file `SYNTHETIC_OK` (the configuration as JSON) written last; a rerun on a complete folder with
the same configuration returns at once. An interrupted run resumes: each finished study leaves a
record in `<out>.partial/.studies/`, and only the others are rendered again.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from competition.progress import progress_bar

from competition.constants import LABELS, SUBTYPES
from competition.pools import worker_initializer
from competition.synthetic.dicom_writer import write_slice
from competition.synthetic.plan import PRESETS, Knobs, StudyPlan, make_plan
from competition.synthetic.render import orientation, render_study

MARKER = "SYNTHETIC_OK"
TRUTH_DIR = "synthetic_truth"
ANSWERS = "stage_2_test_answers.csv"
GENERATOR_VERSION = 2  # 2: stratified test split
_STUDIES = ".studies"


def resolve_config(
    preset: str = "demo", n_patients: int | None = None, size: int | None = None, seed: int = 0, **knobs: float
) -> dict:
    """The full configuration that determines a dataset (what SYNTHETIC_OK records)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    valid = {f.name for f in fields(Knobs)}
    unknown = sorted(set(knobs) - valid)
    if unknown:
        raise ValueError(f"unknown knob(s) {', '.join(unknown)}: valid knobs are {', '.join(sorted(valid))}")
    if p.test_fraction is not None:
        knobs.setdefault("test_fraction", p.test_fraction)
    size = int(size or p.size)
    n_patients = int(n_patients or p.n_patients)
    if n_patients < 2:
        raise ValueError(f"n_patients={n_patients}: need at least 2 (one train and one test patient)")
    if size < 32 or size > 1024:
        raise ValueError(f"size={size}: choose an image size between 32 and 1024 (256 or 512 are usual)")
    return {
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "n_patients": n_patients,
        "size": size,
        "seed": int(seed),
        "slices": list(p.slices),
        "knobs": asdict(Knobs(**{k: float(v) for k, v in knobs.items()})),
    }


def generate(
    out_dir: Path | str,
    *,
    preset: str = "demo",
    n_patients: int | None = None,
    size: int | None = None,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    **knobs: float,
) -> Path:
    """Write a labelled synthetic competition in the Kaggle layout into out_dir; return its path."""
    out = Path(out_dir)
    config = resolve_config(preset, n_patients, size, seed, **knobs)
    if (out / MARKER).exists():
        done = json.loads((out / MARKER).read_text())
        differ = [f"{k}={done.get(k)} (asked {v})" for k, v in config.items() if done.get(k) != v]
        if differ:
            raise ValueError(
                f"{out} holds a synthetic dataset made with a different configuration: {', '.join(differ)}; "
                f"remove it or choose another output folder"
            )
        return out
    if out.exists():
        if any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists but is not a finished synthetic dataset (no {MARKER}); remove it or choose another output folder"
            )
        out.rmdir()

    partial = out.with_name(out.name + ".partial")
    config_file = partial / _STUDIES / "config.json"
    if partial.exists() and (not config_file.exists() or json.loads(config_file.read_text()) != config):
        shutil.rmtree(partial)  # left by a run with other settings: start again
    for sub in ("stage_2_train", "stage_2_test", TRUTH_DIR, _STUDIES):
        (partial / sub).mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(config))

    knob_values = Knobs(**config["knobs"])
    plan = make_plan(config["n_patients"], config["size"], config["seed"], knob_values, tuple(config["slices"]))
    records = _render_all(plan, partial, workers, progress)
    _write_tables(plan, records, partial, config)
    (partial / MARKER).write_text(json.dumps(config, indent=1) + "\n")
    shutil.rmtree(partial / _STUDIES)
    os.replace(partial, out)
    return out


# -- rendering ------------------------------------------------------------------------------


def _record_path(partial: Path, study: StudyPlan) -> Path:
    return partial / _STUDIES / f"{study.series_id}.json"


def _render_all(plan: list[StudyPlan], partial: Path, workers: int, progress: bool) -> dict[str, dict]:
    records: dict[str, dict] = {}
    todo = []
    for study in plan:
        path = _record_path(partial, study)
        if path.exists():
            records[study.series_id] = json.loads(path.read_text())
        else:
            todo.append(study)
    total = sum(s.n_slices for s in plan)
    bar = progress_bar(total=total, initial=total - sum(s.n_slices for s in todo), unit="slice", desc="synthetic",
               disable=not progress)
    # Longest studies first so that the last ones to finish are short.
    todo.sort(key=lambda s: -s.n_slices)
    tasks = [(s, str(partial)) for s in todo]
    if workers <= 1:
        results = map(_write_study, tasks)
        pool = None
    else:
        init, initargs = worker_initializer(_init_worker)  # workers die with this process
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init, initargs=initargs)
        results = pool.imap_unordered(_write_study, tasks)
    try:
        for record in results:
            tmp = partial / _STUDIES / f"{record['series_id']}.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, partial / _STUDIES / f"{record['series_id']}.json")
            records[record["series_id"]] = record
            bar.update(len(record["slices"]))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return records


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already


def _write_study(task: tuple[StudyPlan, str]) -> dict:
    """Render one study, write its DICOM files and bleed masks; return its labels."""
    study, partial_dir = task
    partial = Path(partial_dir)
    folder = partial / f"stage_2_{study.split}"
    row_dir, col_dir = orientation(study.tilt_deg)
    iop = (*row_dir, *col_dir)
    min_area = study.knobs.min_area_mm2
    slices, masks, mask_ids = [], [], []
    for image in render_study(study):
        sop = study.sop_ids[image.index]
        write_slice(
            folder / f"{sop}.dcm", image.hu, sop_id=sop, patient_id=study.patient_id, study_id=study.study_id,
            series_id=study.series_id, ipp=image.ipp, iop=iop, pixel_spacing=study.pixel_spacing,
            window=study.window, intercept_quirk=study.intercept_quirk, truncate=image.index == study.truncated_slice,
        )
        bits = image.mask_bits()
        if bits.any():
            masks.append(bits)
            mask_ids.append(sop)
        slices.append({
            "image_id": sop,
            "slice_index": image.index,
            "labels": [int(v) for v in image.labels(min_area)],
            "area_mm2": [round(float(a), 2) for a in image.area_mm2],
        })
    truth_file = ""
    if masks:
        truth_file = f"{study.series_id}.npz"
        np.savez_compressed(partial / TRUTH_DIR / truth_file, masks=np.stack(masks), image_ids=np.array(mask_ids))
    return {"series_id": study.series_id, "slices": slices, "truth_file": truth_file, "mask_ids": mask_ids}


# -- tables ---------------------------------------------------------------------------------


def _long_rows(image_id: str, labels) -> list[tuple[str, str]]:
    return [(f"{image_id}_{name}", str(value)) for name, value in zip(LABELS, labels)]


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_tables(plan: list[StudyPlan], records: dict[str, dict], root: Path, config: dict) -> None:
    rng = np.random.default_rng([config["seed"], 1])
    by_split: dict[str, list[dict]] = {"train": [], "test": []}
    for study in plan:
        for s in records[study.series_id]["slices"]:
            by_split[study.split].append(s)

    # Train labels in the real file's shape: images in no particular order, six rows each, and a
    # few images listed twice (exact duplicate rows, as in the real stage_2_train.csv).
    train = by_split["train"]
    blocks = [_long_rows(s["image_id"], s["labels"]) for s in (train[i] for i in rng.permutation(len(train)))]
    n_dup = max(1, round(len(train) / 1000))
    for i in rng.choice(len(train), size=n_dup, replace=False):
        blocks.insert(int(rng.integers(0, len(blocks) + 1)), _long_rows(train[i]["image_id"], train[i]["labels"]))
    _write_csv(root / "stage_2_train.csv", ["ID", "Label"], (row for block in blocks for row in block))

    test = sorted(by_split["test"], key=lambda s: s["image_id"])
    _write_csv(root / "stage_2_sample_submission.csv", ["ID", "Label"],
               (row for s in test for row in _long_rows(s["image_id"], ["0.5"] * len(LABELS))))
    _write_csv(root / ANSWERS, ["ID", "Label"], (row for s in test for row in _long_rows(s["image_id"], s["labels"])))

    truth = root / TRUTH_DIR
    index_rows, series_rows, bleed_rows = [], [], []
    for study in plan:
        rec = records[study.series_id]
        row_of = {image_id: i for i, image_id in enumerate(rec["mask_ids"])}
        for s in rec["slices"] if rec["truth_file"] else []:
            index_rows.append([s["image_id"], study.split, study.patient_id, study.study_id, study.series_id,
                               s["slice_index"], rec["truth_file"], row_of.get(s["image_id"], -1), *s["area_mm2"],
                               *s["labels"]])
        truncated = study.sop_ids[study.truncated_slice] if study.truncated_slice >= 0 else ""
        series_rows.append([study.series_id, study.study_id, study.patient_id, study.split, study.n_slices, study.size,
                            study.size, study.pixel_spacing, study.spacing, round(study.tilt_deg, 3),
                            int(study.intercept_quirk), truncated, ";".join(study.subtypes)])
        for b in study.bleeds:
            bleed_rows.append([study.series_id, b.subtype, b.variant, *(round(v, 2) for v in b.centre),
                               round(b.extent, 2), round(b.hu, 1)])
    _write_csv(truth / "index.csv",
               ["image_id", "split", "patient_id", "study_id", "series_id", "slice_index", "file", "row",
                *(f"area_mm2_{t}" for t in SUBTYPES), *LABELS], index_rows)
    _write_csv(truth / "series.csv",
               ["series_id", "study_id", "patient_id", "split", "n_slices", "rows", "columns", "pixel_spacing",
                "slice_spacing", "tilt_deg", "intercept_quirk", "truncated_image_id", "subtypes"], series_rows)
    _write_csv(truth / "bleeds.csv",
               ["series_id", "subtype", "variant", "centre_x", "centre_y", "centre_z", "extent_mm", "hu"], bleed_rows)
