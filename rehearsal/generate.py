"""A fast synthetic competition at the real counts, in the exact Kaggle layout the pipeline reads.

    python -m rehearsal generate --out DIR --scale 1.0 [--size 64] [--workers N] [--seed 0]

Pixels: SIZE x SIZE (64 by default) slices cut from a few phantom heads rendered once by
competition.synthetic (`HEADS` stacks of 60 slices each, no bleeds), reused by every series; a
bleed is painted as +60 HU over a disc at a place of its subtype. Each file is a byte copy of a
per-series DICOM template written by competition.synthetic.dicom_writer, with its SOP id, z and
pixels patched in place (pydicom's own writer costs 6 ms a file: 44 min for 874k on 2 cores).
Counts, label shares and series lengths: see rehearsal.shape. Not rehearsed: the real data's
quirks (12-bit intercept, truncated file, odd sizes, duplicate label rows).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import LABELS, SUBTYPES
from competition.pools import worker_initializer
from competition.synthetic.dataset import ANSWERS
from competition.synthetic.dicom_writer import _dataset, stored_pixels
from competition.synthetic.plan import Knobs, make_plan
from competition.synthetic.render import render_study
from rehearsal.shape import FOLLOWUP_RATE, counts, draw_labels, series_lengths

MARKER = "REHEARSAL_OK"
HEADS, HEAD_SLICES, BLEED_HU, SPACING = 4, 60, 60.0, 5.0
_SOP_SLOT, _Z_SLOT = "ID_zzzzzzzzz", "+99999.999"  # fixed-width placeholders patched per file
CHUNK = 200  # series per worker task


def phantom_stacks(size: int, seed: int, heads: int = HEADS) -> np.ndarray:
    """(heads, HEAD_SLICES, size, size) float32 HU: bleed-free phantom heads, rendered once."""
    plan = make_plan(max(2, heads), size, seed, Knobs(positive_rate=0.0), slices=(HEAD_SLICES, HEAD_SLICES))
    plain = [dataclasses.replace(s, bleeds=[], truncated_slice=-1, intercept_quirk=False, size=size)
             for s in plan[:heads]]
    return np.stack([np.stack([im.hu for im in render_study(s)]) for s in plain]).astype(np.float32)


def bleed_masks(size: int) -> np.ndarray:
    """(5, size, size) bool: one disc per subtype, each at its own place (cheap, not anatomical)."""
    yy, xx = np.mgrid[:size, :size] / size
    centres = [(0.2, 0.5), (0.45, 0.35), (0.5, 0.5), (0.6, 0.65), (0.35, 0.75)]
    return np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < 0.008 for cy, cx in centres])


def _unique_ids(n: int, digits: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct `ID_<hex>` strings of the given width, in random order."""
    values = np.unique(rng.integers(0, 16**digits, size=int(n * 1.05) + 16, dtype=np.int64))
    while len(values) < n:
        values = np.unique(np.r_[values, rng.integers(0, 16**digits, size=n, dtype=np.int64)])
    values = rng.permutation(values)[:n]
    return np.array([f"ID_{v:0{digits}x}" for v in values])


def _patients(n_series: int, rng: np.random.Generator) -> np.ndarray:
    """Patient number of each series: a patient has 1-4 consecutive series (follow-ups)."""
    out, p = np.empty(n_series, np.int64), 0
    i = 0
    while i < n_series:
        k = 1
        while rng.random() < FOLLOWUP_RATE and k < 4:
            k += 1
        out[i:i + k] = p
        i, p = i + k, p + 1
    return out


def plan_split(split: str, n_images: int, rng: np.random.Generator) -> dict:
    lengths = series_lengths(n_images, rng)
    return {"split": split, "lengths": lengths, "labels": draw_labels(lengths, rng),
            "patient": _patients(len(lengths), rng)}


_STACKS: np.ndarray | None = None
_MASKS: np.ndarray | None = None


def _init(stacks: np.ndarray) -> None:
    global _STACKS, _MASKS
    _STACKS, _MASKS = stacks, bleed_masks(stacks.shape[-1])


def _template(series: dict, pixels: np.ndarray) -> tuple[bytearray, list[int], int, int]:
    """A file's bytes with placeholders, the offsets of the SOP id slots, the z slot and the pixels
    (whose values here do not matter: every file overwrites them)."""
    from io import BytesIO

    import pydicom

    with warnings.catch_warnings():  # the ids ("ID_<hex>") are not valid UIDs, as in the real competition
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = _dataset(pixels, _SOP_SLOT, series["patient_id"], series["study_id"], series["series_id"],
                      (series["x"], series["y"], 0.0), (1, 0, 0, 0, 1, 0), series["pixel_spacing"],
                      (["00040", "00040"], ["00080", "00080"]), False, False)
        ds.ImagePositionPatient = [f"{series['x']:g}", f"{series['y']:g}", _Z_SLOT]
        buf = BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = bytearray(buf.getvalue())
    sop, at = [], data.find(_SOP_SLOT.encode())
    while at >= 0:
        sop.append(at)
        at = data.find(_SOP_SLOT.encode(), at + 1)
    z = data.find(_Z_SLOT.encode())
    px_at = len(data) - pixels.nbytes  # PixelData (7FE0,0010), OW, is the last element
    if len(sop) != 2 or z < 0 or data[px_at - 12:px_at - 8] != b"\xe0\x7f\x10\x00":
        raise RuntimeError("rehearsal DICOM template: placeholders not found once each (pydicom layout changed?)")
    return data, sop, z, px_at


def write_series(task: tuple[str, list[dict]]) -> int:
    """Write every slice of each series of the task; return the number of files written."""
    folder, chunk = task
    written = 0
    for series in chunk:
        head = _STACKS[series["head"]]
        n = len(series["image_ids"])
        data, sop_at, z_at, px_at = None, (), 0, 0
        for k, image_id in enumerate(series["image_ids"]):
            hu = head[round(k * (HEAD_SLICES - 1) / max(1, n - 1))].copy()
            for t in np.flatnonzero(series["labels"][k][:len(SUBTYPES)]):
                hu[_MASKS[t]] += BLEED_HU
            pixels = stored_pixels(hu, False)
            if data is None:
                data, sop_at, z_at, px_at = _template(series, pixels)
            for at in sop_at:
                data[at:at + len(_SOP_SLOT)] = image_id.encode()
            data[z_at:z_at + len(_Z_SLOT)] = f"{series['z0'] + SPACING * k:+010.3f}".encode()
            data[px_at:] = pixels.tobytes()
            with open(os.path.join(folder, f"{image_id}.dcm"), "wb") as f:
                f.write(data)
            written += 1
    return written


def _series_records(split: dict, ids: dict, rng: np.random.Generator, size: int, heads: int) -> list[dict]:
    starts = np.r_[0, np.cumsum(split["lengths"])[:-1]]
    head_of = rng.integers(0, heads, size=split["patient"].max() + 1)
    records = []
    for i, (start, n) in enumerate(zip(starts, split["lengths"])):
        p = split["patient"][i]
        records.append({
            "image_ids": ids["image"][start:start + n], "labels": split["labels"][start:start + n],
            "patient_id": ids["patient"][p], "study_id": ids["study"][i], "series_id": ids["series"][i],
            "head": int(head_of[p]), "x": -125.0, "y": round(float(rng.uniform(-140, -100)), 1),
            "z0": round(float(rng.uniform(-150, 350)), 3), "pixel_spacing": round(230.0 / size, 6),
        })
    return records


def _write_tables(root: Path, split: str, image_ids: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
    def long(ids: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        names = np.char.add(np.repeat(ids.astype(str), len(LABELS)).astype(object) + "_",
                            np.tile(np.array(LABELS, dtype=object), len(ids)))
        return pd.DataFrame({"ID": names, "Label": values.reshape(-1)})

    if split == "train":  # images in no particular order, as the real file
        order = rng.permutation(len(image_ids))
        long(image_ids[order], y[order]).to_csv(root / "stage_2_train.csv", index=False)
    else:
        order = np.argsort(image_ids)
        long(image_ids[order], y[order]).to_csv(root / ANSWERS, index=False)
        half = np.full(y.shape, "0.5", dtype=object)
        long(image_ids[order], half).to_csv(root / "stage_2_sample_submission.csv", index=False)


def generate(out: Path | str, scale: float, *, size: int = 64, seed: int = 0, workers: int = 2,
             heads: int = HEADS) -> dict:
    """Write the competition into `out` (skipped when done with the same settings); return its config."""
    out = Path(out)
    n_train, n_test = counts(scale)
    config = {"scale": scale, "size": size, "seed": seed, "heads": heads, "train_images": n_train,
              "test_images": n_test}
    if (out / MARKER).is_file():
        done = json.loads((out / MARKER).read_text())
        if {k: done.get(k) for k in config} != config:
            raise ValueError(f"{out} holds a rehearsal competition of other settings ({done}); remove it or pick another folder")
        return done
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    splits = [plan_split("train", n_train, rng), plan_split("test", n_test, rng)]
    n_series = sum(len(s["lengths"]) for s in splits)
    n_patients = sum(int(s["patient"].max()) + 1 for s in splits)
    all_ids = {"image": _unique_ids(n_train + n_test, 9, rng), "patient": _unique_ids(n_patients, 8, rng)}
    series_ids = _unique_ids(2 * n_series, 10, rng)
    tasks, offsets = [], {"image": 0, "patient": 0, "series": 0}
    for s in splits:
        n_img, n_pat, n_ser = int(s["lengths"].sum()), int(s["patient"].max()) + 1, len(s["lengths"])
        ids = {"image": all_ids["image"][offsets["image"]:offsets["image"] + n_img],
               "patient": all_ids["patient"][offsets["patient"]:offsets["patient"] + n_pat],
               "series": series_ids[offsets["series"]:offsets["series"] + n_ser],
               "study": series_ids[n_series + offsets["series"]:n_series + offsets["series"] + n_ser]}
        offsets = {"image": offsets["image"] + n_img, "patient": offsets["patient"] + n_pat,
                   "series": offsets["series"] + n_ser}
        folder = partial / f"stage_2_{s['split']}"
        folder.mkdir(parents=True)
        records = _series_records(s, ids, rng, size, heads)
        tasks += [(str(folder), records[i:i + CHUNK]) for i in range(0, len(records), CHUNK)]
        _write_tables(partial, s["split"], ids["image"], s["labels"], rng)
    stacks = phantom_stacks(size, seed, heads)
    if workers <= 1:
        _init(stacks)
        files = sum(map(write_series, tasks))
    else:
        init, initargs = worker_initializer(_init, (stacks,))
        with multiprocessing.get_context("spawn").Pool(workers, initializer=init, initargs=initargs) as pool:
            files = sum(pool.imap_unordered(write_series, tasks))
    config |= {"files": files, "series": n_series, "patients": n_patients,
               "pixels": f"{size} x {size}, uint16, intercept -1024"}
    (partial / MARKER).write_text(json.dumps(config, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return config
