"""The synthetic competition: layout, headers against the real sample, quirks, labels, bleed
geometry, prevalence, resumable generation, the scorer and the contact sheet."""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from sklearn.metrics import log_loss

from competition.constants import LABEL_WEIGHTS, LABELS, SUBTYPES
from competition.dicom import DicomReadError, read_hu
from competition.folds import make_folds
from competition.labels import read_labels
from competition.layout import Layout
from competition.metadata import build_metadata
from competition.synthetic import ANSWERS, MARKER, TRUTH_DIR, Knobs, contact_sheet, generate, score_submission
from competition.synthetic.bleeds import sample_bleed
from competition.synthetic.phantom import PARENCHYMA, SUBARACHNOID_SPACES, Head, Tissue
from competition.synthetic.plan import make_plan
from competition.synthetic.render import render_slice

REAL = Path(__file__).resolve().parents[2] / "shared" / "rsna_sample" / "stage_2_test"


def _read(path: Path, **kw) -> pydicom.Dataset:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # Seed 1: one of its 8 patients has a follow-up study (the layout test needs one).
    return generate(tmp_path_factory.mktemp("syn") / "tiny", preset="tiny", seed=1, workers=1, progress=False)


@pytest.fixture(scope="module")
def series(tiny: Path) -> pd.DataFrame:
    return pd.read_csv(tiny / TRUTH_DIR / "series.csv")


@pytest.fixture(scope="module")
def headers(tiny: Path) -> pd.DataFrame:
    rows = []
    for split in ("train", "test"):
        for path in sorted((tiny / f"stage_2_{split}").glob("*.dcm")):
            ds = _read(path, stop_before_pixels=True)
            rows.append({"path": path, "stem": path.stem, "split": split, "sop": ds.SOPInstanceUID,
                         "patient": ds.PatientID, "study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
                         "z": float(ds.ImagePositionPatient[2]), "rows": ds.Rows})
    return pd.DataFrame(rows)


# -- layout ---------------------------------------------------------------------------------


def test_layout_and_csvs(tiny: Path, headers: pd.DataFrame):
    layout = Layout.find(tiny)
    assert layout.stage == "stage_2" and layout.answers == tiny / ANSWERS
    assert (tiny / MARKER).is_file() and not tiny.with_name("tiny.partial").exists()
    assert not list(tiny.glob("stage_2_t*/*.csv"))  # answers live outside the image folders
    assert (headers["stem"] == headers["sop"]).all()

    train = pd.read_csv(tiny / "stage_2_train.csv")
    assert list(train.columns) == ["ID", "Label"]
    dup = train[train.duplicated(keep=False)]
    assert len(dup) >= 6 and not train.drop_duplicates()["ID"].duplicated().any()  # exact duplicates only
    wide = read_labels(tiny / "stage_2_train.csv")
    assert set(wide["image_id"]) == set(headers.loc[headers["split"] == "train", "stem"])
    # six rows per image, in LABELS order
    first = train.drop_duplicates().iloc[:6]["ID"].str.rsplit("_", n=1).str[1].tolist()
    assert first == list(LABELS)

    sample = pd.read_csv(tiny / "stage_2_sample_submission.csv")
    test_ids = set(headers.loc[headers["split"] == "test", "stem"])
    assert len(sample) == 6 * len(test_ids) and (sample["Label"] == 0.5).all()
    assert set(sample["ID"].str.rsplit("_", n=1).str[0]) == test_ids
    answers = pd.read_csv(tiny / ANSWERS)
    assert answers["ID"].tolist() == sample["ID"].tolist()
    assert set(answers["Label"]) <= {0, 1}
    # patients never straddle the split; some patient has several studies
    assert not set(headers.loc[headers["split"] == "train", "patient"]) & set(headers.loc[headers["split"] == "test", "patient"])
    assert headers.groupby("patient")["study"].nunique().max() >= 2


def test_ids_positions_and_file_order(headers: pd.DataFrame):
    assert headers["sop"].str.fullmatch(r"ID_[0-9a-f]{9}").all()
    assert headers["patient"].str.fullmatch(r"ID_[0-9a-f]{8}").all()
    assert headers["study"].str.fullmatch(r"ID_[0-9a-f]{10}").all()
    assert headers["series"].str.fullmatch(r"ID_[0-9a-f]{10}").all()
    assert headers["sop"].is_unique
    in_z_order = 0
    for _, g in headers.groupby("series"):
        assert 20 <= len(g) <= 40
        steps = np.diff(np.sort(g["z"].to_numpy()))
        assert np.allclose(steps, steps[0], atol=1e-3) and 3.0 <= steps[0] <= 6.5
        in_z_order += g.sort_values("stem")["z"].is_monotonic_increasing
    assert in_z_order == 0  # file names say nothing about z


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/rsna_sample is not present")
def test_headers_match_the_real_sample(tiny: Path, headers: pd.DataFrame, series: pd.DataFrame):
    real = _read(sorted(REAL.glob("*.dcm"))[0])
    plain = series.loc[series["intercept_quirk"] == 0, "series_id"]
    ours = _read(headers.loc[headers["series"].isin(plain), "path"].iloc[0])
    assert [(e.keyword, e.VR) for e in ours] == [(e.keyword, e.VR) for e in real]
    assert ours.file_meta.TransferSyntaxUID == real.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    for key in ("Modality", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
                "PhotometricInterpretation", "RescaleIntercept", "RescaleSlope"):
        assert ours[key].value == real[key].value, key
    assert ours.pixel_array.dtype == real.pixel_array.dtype == np.uint16
    iop = np.array(ours.ImageOrientationPatient, dtype=float)
    assert np.isclose(np.linalg.norm(iop[:3]), 1) and np.isclose(np.linalg.norm(iop[3:]), 1) and np.isclose(iop[:3] @ iop[3:], 0)
    # windows: the real files' multi-valued, zero-padded strings are the most common form
    centres = Counter()
    for path in headers["path"]:
        raw = _read(path, stop_before_pixels=True)["WindowCenter"]
        centres[str(raw.value)] += 1
    assert centres.most_common(1)[0][0] == str(real["WindowCenter"].value) == "[00040, 00040]"


# -- pixels and quirks ----------------------------------------------------------------------


def _plan_for(tiny: Path):
    config = json.loads((tiny / MARKER).read_text())
    return make_plan(config["n_patients"], config["size"], config["seed"], Knobs(**config["knobs"]), tuple(config["slices"]))


def test_pixels_read_back_as_rendered_hu(tiny: Path, series: pd.DataFrame):
    """read_hu (with its 12-bit fix) gives back what was rendered, for plain and quirk series."""
    plan = {s.series_id: s for s in _plan_for(tiny)}
    quirk = series.loc[series["intercept_quirk"] == 1, "series_id"].iloc[0]
    plain = series.loc[(series["intercept_quirk"] == 0) & (series["truncated_image_id"].isna()), "series_id"].iloc[0]
    for sid in (plain, quirk):
        study = plan[sid]
        rng = np.random.default_rng(study.seed)
        for k in range(3):  # the noise stream runs slice by slice, so render them in order
            image = render_slice(study, k, rng)
        path = tiny / f"stage_2_{study.split}" / f"{study.sop_ids[2]}.dcm"
        got = read_hu(path)
        want = np.clip(np.rint(image.hu), -1000 if study.intercept_quirk else -1024, 3071)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 0.5, sid
        ds = _read(path, stop_before_pixels=True)
        if study.intercept_quirk:
            assert ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100
            raw = _read(path).pixel_array.astype(float) + float(ds.RescaleIntercept)
            assert np.median(raw[got < -900]) > 3000  # unfixed, air would read as dense as bone
        else:
            assert float(ds.RescaleIntercept) == -1024


def test_quirk_files(tiny: Path, series: pd.DataFrame, headers: pd.DataFrame):
    size = json.loads((tiny / MARKER).read_text())["size"]
    assert series["intercept_quirk"].sum() >= 1
    odd = series[series["rows"] != size]
    assert len(odd) >= 1 and (headers[headers["series"].isin(odd["series_id"])]["rows"] != size).all()
    truncated = series["truncated_image_id"].dropna()
    assert len(truncated) == 1
    image_id = truncated.iloc[0]
    assert series.loc[series["truncated_image_id"].notna(), "split"].tolist() == ["train"]
    path = tiny / "stage_2_train" / f"{image_id}.dcm"
    assert _read(path, stop_before_pixels=True).SOPInstanceUID == image_id  # the header still reads
    with pytest.raises(DicomReadError):
        read_hu(path)
    assert image_id in set(read_labels(tiny / "stage_2_train.csv")["image_id"])
    # every other file decodes
    bad = []
    for path in headers["path"]:
        try:
            read_hu(path)
        except DicomReadError:
            bad.append(path.stem)
    assert bad == [image_id]


def test_foundation_reads_it_without_special_cases(tiny: Path, tmp_path: Path):
    meta = build_metadata(tiny, tmp_path / "metadata.parquet", workers=1, progress=False)
    labels = read_labels(tiny / "stage_2_train.csv")
    answers = read_labels(tiny / ANSWERS)
    assert len(meta) == len(labels) + len(answers)
    assert set(meta.loc[meta["split"] == "test", "image_id"]) == set(answers["image_id"])
    folds = make_folds(meta, labels, n_folds=3, seed=0)
    assert len(folds) == len(labels) and folds.groupby("patient_id")["fold"].nunique().max() == 1
    # the metadata's z order is the generator's slice order
    index = pd.read_csv(tiny / TRUTH_DIR / "index.csv")
    merged = index.merge(meta, on="image_id", suffixes=("", "_meta"))
    assert len(merged) == len(index) and (merged["slice_index"] == merged["slice_index_meta"]).all()
    assert meta["window_center"].notna().all() and (meta["intercept"] != 0).sum() > 0


# -- labels and bleeds ----------------------------------------------------------------------


def test_labels_agree_with_the_truth(tiny: Path):
    index = pd.read_csv(tiny / TRUTH_DIR / "index.csv")
    labels = pd.concat([read_labels(tiny / "stage_2_train.csv"), read_labels(tiny / ANSWERS)]).set_index("image_id")
    min_area = Knobs().min_area_mm2
    for t in SUBTYPES:
        assert (index[t] == (index[f"area_mm2_{t}"] >= min_area)).all()
        assert (labels.loc[index["image_id"], t].to_numpy() == index[t].to_numpy()).all()
        assert labels[t].sum() > 0, t  # every subtype shows up in the tiny preset
    assert (labels["any"] == labels[list(SUBTYPES)].max(axis=1)).all()
    negatives = labels.index.difference(index["image_id"])
    assert labels.loc[negatives, "any"].sum() == 0  # series without bleeds are all negative
    # masks: the npz rows name their slices; positive slices have mask pixels of their subtype
    for file, group in index[index["row"] >= 0].groupby("file"):
        npz = np.load(tiny / TRUTH_DIR / file)
        assert npz["masks"].dtype == np.uint8 and len(npz["masks"]) == len(npz["image_ids"])
        for _, r in group.iterrows():
            assert npz["image_ids"][r["row"]] == r["image_id"]
            bits = npz["masks"][r["row"]]
            for i, t in enumerate(SUBTYPES):
                if r[t]:
                    assert ((bits >> i) & 1).any(), (r["image_id"], t)


def test_bleeds_are_dense_in_the_images(tiny: Path):
    """Inside its mask a bleed reads 50-90 HU minus blur; brain around it reads less."""
    index = pd.read_csv(tiny / TRUTH_DIR / "index.csv")
    series = pd.read_csv(tiny / TRUTH_DIR / "series.csv").set_index("series_id")
    inside, brain = [], []
    for _, r in index[(index["row"] >= 0) & (index["any"] == 1)].iterrows():
        split = series.loc[r["series_id"], "split"]
        path = tiny / f"stage_2_{split}" / f"{r['image_id']}.dcm"
        if r["image_id"] == series.loc[r["series_id"], "truncated_image_id"]:
            continue
        hu = read_hu(path)
        bits = np.load(tiny / TRUTH_DIR / r["file"])["masks"][r["row"]]
        inside.append(hu[bits > 0])
        brain.append(hu[(bits == 0) & (hu > 15) & (hu < 45)])
    assert np.median(np.concatenate(inside)) > np.median(np.concatenate(brain)) + 10


def _voxels(head: Head, bleed, step: float = 1.5):
    c, r = np.asarray(bleed.centre), bleed.extent
    axis = np.arange(-r, r + step, step, dtype=np.float32)
    x, y, z = (a.ravel() + np.float32(o) for a, o in zip(np.meshgrid(axis, axis, axis, indexing="ij"), c))
    geo = head.geometry(x, y, z)
    tissue = head.tissue(x, y, z, geo)[0]
    m = bleed.mask(x, y, z, head, geo, tissue)
    return x[m], y[m], z[m], geo.depth_in[m], tissue[m]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleed_geometry_per_subtype(seed: int):
    """Each subtype sits where its name says and has the shape it should."""
    rng = np.random.default_rng(seed)
    head = Head.sample(rng)
    shape = {}
    for subtype in SUBTYPES:
        bleed = sample_bleed(subtype, head, rng, scale=1.0, hu=70.0)
        x, y, z, depth, tissue = _voxels(head, bleed)
        assert len(x) > 50, subtype
        if subtype in ("epidural", "subdural"):
            assert depth.min() < 1.5 and depth.max() < 20  # against the inner table
            thickness = depth.max()
            span = np.ptp(np.stack([x, y, z]), axis=1).max()
            shape[subtype] = thickness / span
            if subtype == "subdural":
                assert (np.sign(x) == np.sign(bleed.u[0])).all()  # stops at the falx
        elif subtype == "subarachnoid":
            assert np.isin(tissue, [int(t) for t in SUBARACHNOID_SPACES]).all()
            # thin lines: far fewer voxels than the ball they are spread through
            assert len(x) * 1.5**3 < 0.3 * (4 / 3 * np.pi * bleed.radius**3)
        elif subtype == "intraparenchymal":
            assert np.isin(tissue, [int(t) for t in PARENCHYMA]).all()
            assert np.median(depth) > 8  # a blob inside the brain, not along its surface
        else:
            assert (tissue == Tissue.VENTRICLE).all()
    assert shape["epidural"] > 1.5 * shape["subdural"]  # lens: thick and short; crescent: thin and long


def test_plan_prevalence_and_determinism():
    """Study-level subtype mix of a large plan (no rendering): epidural rarest, positives near the knob."""
    knobs = Knobs()
    plan = make_plan(1000, 64, 7, knobs)
    first = [s for s in plan if s.index == min(t.index for t in plan if t.patient_id == s.patient_id)]
    has = pd.DataFrame([{t: t in s.subtypes for t in SUBTYPES} for s in first])
    assert abs(has.any(axis=1).mean() - knobs.positive_rate) < 0.05
    rates = has.mean()
    assert rates.idxmin() == "epidural" and rates["epidural"] < 0.03
    assert (rates[["intraparenchymal", "intraventricular", "subarachnoid", "subdural"]] > 0.08).all()
    assert 1.1 < len(plan) / 1000 < 1.3  # some patients have follow-up studies
    again = make_plan(1000, 64, 7, knobs)
    assert [s.sop_ids for s in again] == [s.sop_ids for s in plan]
    assert [s.subtypes for s in again] == [s.subtypes for s in plan]


def test_split_patients_is_stratified_against_a_count():
    """Each stratum gets its share of test patients to within one, the total is exact."""
    from competition.synthetic.plan import PRIMARY, split_patients, stratum

    rng = np.random.default_rng(3)
    sets = [[] if rng.random() < 0.6 else sorted(rng.choice(list(PRIMARY), rng.integers(1, 3), replace=False))
            for _ in range(203)]
    for fraction in (0.1, 0.3, 0.5):
        is_test = split_patients(sets, fraction, np.random.default_rng(1))
        assert is_test.sum() == round(fraction * len(sets))
        keys = pd.Series([stratum(s) for s in sets])
        for key, members in keys.groupby(keys).groups.items():
            assert abs(is_test[list(members)].sum() - fraction * len(members)) <= 1, (key, fraction)
        assert (split_patients(sets, fraction, np.random.default_rng(1)) == is_test).all()
    assert split_patients([[], ["subdural"]], 0.9, rng).sum() == 1  # never every patient


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_plan_test_split_is_large_and_alike(seed: int):
    """The demo preset (plan only): >= 25% of patients and >= 1,000 test slices; study and subtype
    prevalence of train and test within a few points; patients never straddle the split."""
    from competition.synthetic.dataset import resolve_config

    config = resolve_config("demo", seed=seed)
    plan = make_plan(config["n_patients"], 64, seed, Knobs(**config["knobs"]), tuple(config["slices"]))
    split = {s: [t for t in plan if t.split == s] for s in ("train", "test")}
    patients = {s: {t.patient_id for t in studies} for s, studies in split.items()}
    assert not patients["train"] & patients["test"]
    assert len(patients["test"]) >= 0.25 * config["n_patients"]
    assert sum(t.n_slices for t in split["test"]) >= 1000
    rate = {s: np.mean([bool(t.subtypes) for t in studies]) for s, studies in split.items()}
    assert abs(rate["train"] - rate["test"]) < 0.08, rate
    for subtype in ("intraparenchymal", "intraventricular", "subarachnoid", "subdural"):
        share = {s: np.mean([subtype in t.subtypes for t in studies]) for s, studies in split.items()}
        assert abs(share["train"] - share["test"]) < 0.1, (subtype, share)


@pytest.mark.slow
def test_slice_prevalence_near_the_real_data():
    """Slice-level rates over ~350 studies (labels only, no images): near the real data's."""
    from competition.synthetic.render import study_areas

    knobs = Knobs()
    plan = make_plan(300, 128, 11, knobs)
    labels = np.concatenate([study_areas(s) >= knobs.min_area_mm2 for s in plan])
    rates = dict(zip(SUBTYPES, labels.mean(axis=0)))
    assert 0.09 < labels.any(axis=1).mean() < 0.19
    real = {"epidural": 0.004, "intraparenchymal": 0.048, "intraventricular": 0.035, "subarachnoid": 0.047, "subdural": 0.063}
    for t, r in real.items():
        assert r / 2.5 < rates[t] < r * 2.5, (t, rates[t])
    assert min(rates, key=rates.get) == "epidural"


# -- generation behaviour -------------------------------------------------------------------


def test_rerun_resume_and_determinism(tmp_path: Path, monkeypatch):
    from competition.synthetic import generate as gen_fn
    import competition.synthetic.dataset as gen

    ref = gen_fn(tmp_path / "ref", preset="tiny", n_patients=3, size=32, seed=5, workers=1, progress=False)
    marker_time = (ref / MARKER).stat().st_mtime_ns
    # A rerun of a finished generation renders nothing (its speed: `make bench-checks`).
    def no_render(task):
        raise AssertionError("a finished generation was rendered again")

    render = gen._write_study
    monkeypatch.setattr(gen, "_write_study", no_render)
    assert gen_fn(ref, preset="tiny", n_patients=3, size=32, seed=5, workers=1, progress=False) == ref
    monkeypatch.setattr(gen, "_write_study", render)
    assert (ref / MARKER).stat().st_mtime_ns == marker_time
    with pytest.raises(ValueError, match="different configuration"):
        gen_fn(ref, preset="tiny", n_patients=3, size=32, seed=6, workers=1, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError):
        gen_fn(tmp_path / "other", preset="tiny", n_patients=3, size=32, workers=1, progress=False)
    with pytest.raises(ValueError, match="unknown knob"):
        gen_fn(tmp_path / "k", preset="tiny", bleed_size=2.0)

    # Interrupt after two studies, then resume: the result is the same as an uninterrupted run.
    real_write = gen._write_study
    calls = {"n": 0}

    def flaky(task):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real_write(task)

    monkeypatch.setattr(gen, "_write_study", flaky)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        gen_fn(out, preset="tiny", n_patients=3, size=32, seed=5, workers=1, progress=False)
    assert not out.exists() and len(list((tmp_path / "resumed.partial" / ".studies").glob("ID_*.json"))) == 2
    monkeypatch.setattr(gen, "_write_study", real_write)
    # ...and with two worker processes, which must not change a byte.
    gen_fn(out, preset="tiny", n_patients=3, size=32, seed=5, workers=2, progress=False)
    for name in ("stage_2_train.csv", ANSWERS, f"{TRUTH_DIR}/index.csv", f"{TRUTH_DIR}/series.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.dcm"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*.dcm"))
    for rel in files[:: max(1, len(files) // 10)]:
        assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel


# -- scorer and picture ---------------------------------------------------------------------


def test_scorer_against_sklearn(tiny: Path, tmp_path: Path):
    answers = pd.read_csv(tiny / ANSWERS)
    sample = tiny / "stage_2_sample_submission.csv"
    assert score_submission(sample, tiny / ANSWERS)["weighted_log_loss"] == pytest.approx(np.log(2))

    rng = np.random.default_rng(0)
    sub = answers.assign(Label=np.clip(answers["Label"] * 0.6 + rng.uniform(0, 0.4, len(answers)), 0, 1))
    sub = sub.sample(frac=1, random_state=0)  # order does not matter
    path = tmp_path / "sub.csv.gz"
    with gzip.open(path, "wt") as f:
        sub.to_csv(f, index=False)
    scores = score_submission(path, tiny / ANSWERS)
    label = answers["ID"].str.rsplit("_", n=1).str[1]
    merged = answers.merge(sub, on="ID", suffixes=("", "_p"))
    weights = label.map(dict(zip(LABELS, LABEL_WEIGHTS))).to_numpy()
    want = log_loss(merged["Label"], merged["Label_p"], sample_weight=weights, labels=[0, 1])
    assert scores["weighted_log_loss"] == pytest.approx(want, rel=1e-6)
    for t in LABELS:
        m = (label == t).to_numpy()
        assert scores[t] == pytest.approx(log_loss(merged["Label"][m], merged["Label_p"][m], labels=[0, 1]), rel=1e-6)

    missing = sub.iloc[1:]
    missing.to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(ValueError, match=re.escape(sub["ID"].iloc[0])):
        score_submission(tmp_path / "missing.csv", tiny / ANSWERS)
    extra = pd.concat([sub, pd.DataFrame({"ID": ["ID_000000000_any"], "Label": [0.5]})])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(ValueError, match="ID_000000000_any"):
        score_submission(tmp_path / "extra.csv", tiny / ANSWERS)


def test_cli_score_and_sheet(tiny: Path, tmp_path: Path, capsys):
    from competition.synthetic.__main__ import main

    assert main(["score", str(tiny / "stage_2_sample_submission.csv"), str(tiny / ANSWERS)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^weighted_log_loss: 0\.69315$", out, re.M) and "subdural: 0.69315" in out
    png = contact_sheet(tiny, tmp_path / "sheet.png", columns=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["score", str(tmp_path / "nope.csv"), str(tiny / ANSWERS)]) == 2


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown preset"):
        generate(tmp_path / "x", preset="huge")
    with pytest.raises(ValueError, match="n_patients"):
        generate(tmp_path / "x", preset="tiny", n_patients=1, workers=1, progress=False)
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path / "x", preset="tiny", size=8, workers=1, progress=False)
    assert not list(tmp_path.iterdir())  # nothing written for a bad request
