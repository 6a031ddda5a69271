"""make predict / make export on a tiny trained work folder: a competition test image gets the
stacked submission's probabilities (and each member alone its level-1 test prediction), also beside
a test slice the pipeline could not read; bad files are skipped and listed, a bundle predicts the
same in a fresh folder, and a tampered bundle is refused."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from competition.constants import LABELS
from conftest import prepare_tiny_competition
from competition.paths import WorkPaths
from level2_stacking.fitted import load_fitted
from prediction.bundle import BundleError, export_bundle, open_bundle
from prediction.ensemble import from_work
from prediction.predictor import Predictor
from prediction.run import predict_folder
from prediction.study import NothingToPredict, read_study

torch.set_num_threads(1)
# A 2-D model (test_resnet, bsb) and a 2.5D one (test_efficientnet, brain of three slices), both
# reading a 64 px cache at 32 px: the cache-size resize and the neighbour order are exercised.
MODELS = ("tiny_resnet", "tiny_efficientnet")
OVERRIDES = dict(epochs=1, img_size=32, batch_size=16, workers=0, device="cpu", augment=False, pretrained=False)


def truncate_a_middle_test_slice(data: Path) -> None:
    """Cut short the pixel data of the middle slice of the last test series (by SeriesInstanceUID)."""
    headers = [(pydicom.dcmread(f, stop_before_pixels=True), f) for f in sorted((data / "stage_2_test").glob("*.dcm"))]
    last = max(str(h.SeriesInstanceUID) for h, _ in headers)
    series = sorted((float(h.ImagePositionPatient[2]), f) for h, f in headers if str(h.SeriesInstanceUID) == last)
    target = series[len(series) // 2][1]
    target.write_bytes(target.read_bytes()[:-3000])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, WorkPaths]:
    """Both models trained, then stacked (LightGBM + sequence model, blended) as `make stack` does,
    on a competition with one unreadable test slice inside a series."""
    from level1_models.train import run_model
    from level2_stacking.pipeline import StackSettings, run_stack
    from level2_stacking.sequence import SequenceSettings

    tmp = tmp_path_factory.mktemp("predict")
    data, paths = prepare_tiny_competition(tmp, damage=truncate_a_middle_test_slice)
    for name in MODELS:
        run_model(name, data, paths.root, OVERRIDES)
    # Two folds leave no inner fold for early stopping: fixed rounds; leaves small enough for ~60 rows.
    run_stack(data, paths.root, StackSettings(
        stacker="blend", num_threads=1, k_neighbours=2, num_boost_round=30, early_stopping_rounds=None,
        params={"min_data_in_leaf": 5, "learning_rate": 0.2}, embedding_dim=8, progress=False, brain_ratio=True,
        sequence=SequenceSettings(hidden=16, layers=1, embedding_proj=8, epochs=3, threads=1)))
    return data, paths


def pipeline_test(paths: WorkPaths, name: str) -> pd.DataFrame:
    return pd.read_parquet(paths.model_dir(name) / "test.parquet").set_index("image_id")[list(LABELS)]


def stacked_test(paths: WorkPaths) -> pd.DataFrame:
    """The stacked submission's rows of the test images make predict can read (not the unreadable one)."""
    unreadable = pd.read_csv(paths.bad_files)["image_id"]
    table = pd.read_parquet(paths.stack / "test.parquet").set_index("image_id")[list(LABELS)]
    return table.drop(index=unreadable[unreadable.isin(table.index)])


def test_predict_equals_the_stacked_submission(trained, tmp_path):
    data, paths = trained
    out = predict_folder(data / "stage_2_test", paths, out=tmp_path / "out", device="cpu", report=False)
    slices = pd.read_csv(out / "slices.csv").set_index("image_id")
    expected = stacked_test(paths)
    assert set(slices.index) == set(expected.index)
    got = slices.loc[expected.index, list(LABELS)].to_numpy()
    # Every row, the unreadable slice's neighbours too: level 2 reads it with level 1's prior in its place.
    np.testing.assert_allclose(got, expected.to_numpy(), atol=1e-4, rtol=0)
    (bad,) = [p for p in pd.read_csv(paths.bad_files)["path"] if p.startswith("stage_2_test/")]
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["path"].tolist() == [Path(bad).name] and "pixel data" in skipped["reason"][0]
    # Level 2 really moved the probabilities away from the level-1 mean (the old answer).
    level1 = np.mean([pipeline_test(paths, m).loc[expected.index].to_numpy() for m in MODELS], axis=0)
    assert np.abs(got - level1).max() > 1e-3  # ten times the tolerance above
    run = json.loads((out / "run.json").read_text())
    assert run["level"].startswith("level 2 (blend stack") and run["level2"] == "stacked"
    # The brain ratios `make predict` computes from the DICOMs are the cache's (the boosters read them).
    assert load_fitted(paths.stack).feature_config.brain_ratio
    assert run["threshold"]["predictions"] == "level-2 stack OOF"
    # Real predictions, not the training prior every test image once got.
    assert slices["any"].std() > 1e-4
    metadata = pd.read_parquet(paths.metadata).set_index("image_id")
    assert (slices["slice_index"] == metadata.loc[slices.index, "slice_index"]).all()
    studies = pd.read_csv(out / "studies.csv")
    assert sorted(studies["study_id"]) == sorted(metadata.loc[slices.index, "study_id"].unique())
    assert (studies.set_index("study_id")["any"] == slices.groupby("study_id")["any"].max()).all()


def test_each_stacker_reads_the_series_whole_as_the_pipeline_did(trained):
    """LightGBM's and the sequence model's own test rows (stack/<stacker>/test.parquet), the
    unreadable slice's neighbours included: read without the slice in its place, the sequence
    model's rows move by ~1e-4 here, a hundred times this tolerance."""
    data, paths = trained
    predictor = Predictor("cpu").load(from_work(paths))
    study = read_study(data / "stage_2_test")
    result = predictor.predict(study)
    probs, meta, pooled, readable = predictor.level2_inputs(study, result.per_fold, result.embeddings)
    assert not readable.all() and meta.loc[~readable, "image_id"].isin(pd.read_csv(paths.bad_files)["image_id"]).all()
    candidates = predictor.stack.candidates(probs, meta, pooled)
    ids = meta.loc[readable, "image_id"]
    for name, folder in (("lightgbm", "lightgbm"), ("sequence model", "sequence")):
        saved = pd.read_parquet(paths.stack / folder / "test.parquet").set_index("image_id").loc[ids, list(LABELS)]
        np.testing.assert_allclose(candidates[name][readable], saved.to_numpy(), atol=1e-6, rtol=0, err_msg=name)


def test_each_member_alone_is_its_test_parquet(trained):
    data, paths = trained
    ensemble = from_work(paths)
    for member in ensemble.members:  # the cache each model read, recorded by its run
        assert json.loads((paths.model_dir(member.name) / "config.json").read_text())["runtime"]["cache_size"] == 64
        assert (member.cache_size, member.crop, member.folds) == (64, True, (0, 1))
        metrics = json.loads((paths.model_dir(member.name) / "metrics.json").read_text())
        assert member.oof_weighted_log_loss == metrics["pooled"]["weighted_log_loss"]
    assert ensemble.best_member().oof_weighted_log_loss == min(m.oof_weighted_log_loss for m in ensemble.members)
    predictor = Predictor("cpu").load(ensemble)
    result = predictor.predict(read_study(data / "stage_2_test"))
    ids = result.slices["image_id"]
    for name in MODELS:
        mine = result.per_fold[name].mean(axis=0)
        np.testing.assert_allclose(mine, pipeline_test(paths, name).loc[ids].to_numpy(), atol=1e-4, rtol=0)
        for k in (0, 1):  # the pooled features level 2 reads, as the fold saved them for the test images
            fold_ids = pd.read_parquet(paths.model_dir(name) / f"fold{k}" / "test.parquet")["image_id"]
            saved = np.load(paths.model_dir(name) / f"fold{k}" / "embeddings_test.npy")
            rows = pd.Index(fold_ids).get_indexer(ids)
            np.testing.assert_allclose(result.embeddings[name][k].astype(np.float32), saved[rows].astype(np.float32),
                                       atol=2e-3, rtol=2e-3)


def _copy_with(src: Path, dst: Path, **fields) -> None:
    ds = pydicom.dcmread(src)
    for key, value in fields.items():
        setattr(ds, key, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)


def test_bad_files_are_skipped_and_listed(trained, tmp_path):
    data, paths = trained
    meta = pd.read_parquet(paths.metadata)
    series = meta[meta["split"] == "test"].groupby("series_id")
    sid, rows = next(iter(series))
    rows = rows.sort_values("slice_index")
    study = tmp_path / "study"
    for k, rel in enumerate(rows["path"]):  # nested folders, names without .dcm
        target = study / f"sub{k % 2}" / f"IM{k:04d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / rel, target)
    truncated = study / "sub1" / "IM0003"
    truncated.write_bytes(truncated.read_bytes()[:-3000])  # header intact, pixel data cut short
    first = data / rows["path"].iloc[0]
    _copy_with(first, study / "mr" / "x1", Modality="MR", SOPInstanceUID="ID_mr0000001")
    _copy_with(first, study / "scout", ImageOrientationPatient=[1, 0, 0, 0, 0, -1], SOPInstanceUID="ID_sc0000001")
    _copy_with(first, study / "loc", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SOPInstanceUID="ID_lo0000001")
    _copy_with(first, study / "sub9" / "again.dcm")  # the same slice twice, found after the first
    (study / "notes.txt").write_text("not a DICOM file\n")
    headerless = study / "sub0" / "IM0002"  # written without preamble and file meta: still read
    bare = pydicom.Dataset()
    for element in pydicom.dcmread(headerless):
        bare.add(element)
    bare.save_as(headerless, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert headerless.read_bytes()[128:132] != b"DICM"
    out = predict_folder(study, paths, out=tmp_path / "out", device="cpu", report=False)
    skipped = pd.read_csv(out / "skipped.csv").set_index("path")["reason"]
    assert sorted(skipped.index) == ["loc", "mr/x1", "notes.txt", "scout", "sub1/IM0003", "sub9/again.dcm"]
    assert "LOCALIZER" in skipped["loc"] and "duplicate of sub0/IM0000" in skipped["sub9/again.dcm"]
    assert "not CT" in skipped["mr/x1"] and "not a DICOM" in skipped["notes.txt"]
    assert "not axial" in skipped["scout"] and "pixel data" in skipped["sub1/IM0003"]
    slices = pd.read_csv(out / "slices.csv")
    assert len(slices) == len(rows) - 1 and set(slices["series_id"]) == {sid}
    # The truncated slice keeps its place in the z order, as in the competition's metadata.
    kept = rows[rows["path"] != rows["path"].iloc[3]]
    assert slices["image_id"].tolist() == kept["image_id"].tolist()
    assert slices["slice_index"].tolist() == kept["slice_index"].tolist()

    only_text = tmp_path / "empty"
    only_text.mkdir()
    (only_text / "readme.txt").write_text("hello")
    with pytest.raises(NothingToPredict, match="no axial CT slice"):
        read_study(only_text)


def test_export_then_predict_in_a_fresh_folder(trained, tmp_path):
    data, paths = trained
    bundle = export_bundle(paths, tmp_path / "ens.tar")
    with tarfile.open(bundle) as tar:  # the fitted level 2 travels, the stack's tables do not
        names = tar.getnames()
    assert "stack/fitted/manifest.json" in names and "stack/fitted/lightgbm/fold1_any.txt" in names
    assert "stack/fitted/sequence/fold0.pt" in names and "stack/oof.parquet" not in names
    assert "models/tiny_resnet/fold1/done.json" in names  # the fold's prior_rates, for unreadable slices
    expected = stacked_test(paths)
    shutil.move(paths.root, tmp_path / "moved")  # nothing may be read from the work folder
    try:
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        shutil.copy(bundle, fresh / "ens.tar")
        run = subprocess.run([sys.executable, "-m", "prediction", "predict", "--bundle", "ens.tar", "--study",
                              str(data / "stage_2_test"), "--device", "cpu", "--no-report"], cwd=fresh,
                             capture_output=True, text=True, timeout=300,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    finally:
        shutil.move(tmp_path / "moved", paths.root)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no prior for unreadable slices" not in run.stderr and "pixel data" in run.stderr
    out = fresh / run.stdout.strip().splitlines()[-1]
    assert out == fresh / "work" / "ens" / "predict" / "stage_2_test"
    from_bundle = pd.read_csv(out / "slices.csv").set_index("image_id")
    np.testing.assert_allclose(from_bundle.loc[expected.index, list(LABELS)].to_numpy(), expected.to_numpy(),
                               atol=1e-4, rtol=0)
    studies = pd.read_csv(out / "studies.csv")
    assert studies["threshold"].notna().all()  # the OOF threshold travels in the bundle
    # A bundle of one model carries no level 2 (it was fit on both) and predicts that model's level 1.
    one = export_bundle(paths, tmp_path / "one.tar", models=["tiny_resnet"])
    with tarfile.open(one) as tar:
        assert "none: the stack was fit on models" in json.load(tar.extractfile("manifest.json"))["level2"]
    single = open_bundle(one)
    assert single.not_stacked.startswith("no fitted level 2") and not (single.root / "stack").exists()


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a tar member by member; ``edit(name, bytes)`` returns the new (name, bytes) or None to drop."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            got = edit(info.name, tin.extractfile(info).read())
            if got is None:
                continue
            name, payload = got
            new = tarfile.TarInfo(name)
            new.size = len(payload)
            tout.addfile(new, io.BytesIO(payload))
    return dst


def test_a_tampered_bundle_is_refused(trained, tmp_path):
    _, paths = trained
    bundle = export_bundle(paths, tmp_path / "ens.tar", models=["tiny_resnet"])
    assert open_bundle(bundle).members[0].name == "tiny_resnet"
    weights = "models/tiny_resnet/fold0/best.pt"

    def flip(name, payload):
        if name == weights:
            payload = payload[:-100] + bytes([payload[-100] ^ 1]) + payload[-99:]
        return name, payload

    with pytest.raises(BundleError, match="does not match the hash"):
        open_bundle(_rewrite(bundle, tmp_path / "flipped.tar", flip))
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(_rewrite(bundle, tmp_path / "escape.tar",
                             lambda n, p: ("../" + n if n == weights else n, p)))
    with pytest.raises(BundleError, match="missing"):
        open_bundle(_rewrite(bundle, tmp_path / "short.tar", lambda n, p: None if n == weights else (n, p)))

    def old_version(name, payload):
        if name == "manifest.json":
            manifest = json.loads(payload)
            manifest["version"] = 0
            payload = json.dumps(manifest).encode()
        return name, payload

    with pytest.raises(BundleError, match="format version 0, this project reads version 1"):
        open_bundle(_rewrite(bundle, tmp_path / "old.tar", old_version))


def test_the_real_series(trained, real_sample, tmp_path):
    """One real RSNA series with models trained on synthetic data: every slice, one study, a report."""
    _, paths = trained
    out = predict_folder(real_sample, paths, out=tmp_path / "out", device="cpu", top=2)
    slices = pd.read_csv(out / "slices.csv")
    stems = sorted(p.stem for p in (real_sample / "stage_2_test").glob("*.dcm"))
    assert len(slices) == 32 and sorted(slices["image_id"]) == stems
    assert slices["slice_index"].tolist() == list(range(32)) and slices["z"].is_monotonic_increasing
    assert len(pd.read_csv(out / "studies.csv")) == 1
    page = (out / "report.html").read_text()
    assert "not a medical device" in page and page.count("data:image/png;base64,") == 1 + 2
    assert "README.md" in pd.read_csv(out / "skipped.csv")["path"].tolist()


def test_hu_kept_as_int16_only_where_exact():
    from prediction.study import compact

    whole = np.array([[-1024.0, 40.0], [3071.0, 0.0]], np.float32)
    assert compact(whole).dtype == np.int16 and np.array_equal(compact(whole), whole)
    for inexact in (np.array([[0.5, 1.0]], np.float32), np.array([[40000.0, 0.0]], np.float32)):
        assert compact(inexact) is inexact


def test_out_of_memory_halves_the_batch(trained, monkeypatch):
    import level1_models.predict as level1_predict
    import prediction.predictor as predictor_module

    data, paths = trained
    real = level1_predict.predict_probabilities
    seen = []

    def tight(*args, batch_size, **kwargs):  # a device that holds at most 8 slices
        seen.append(batch_size)
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(predictor_module, "predict_probabilities", tight)
    study = read_study(data / "stage_2_test")
    predictor = Predictor("cpu", batch_size=64).load(from_work(paths, ["tiny_resnet"]))
    result = predictor.predict(study)
    assert seen[:4] == [64, 32, 16, 8] and predictor.batch_size == 8
    expected = pipeline_test(paths, "tiny_resnet").loc[result.slices["image_id"]].to_numpy()
    np.testing.assert_allclose(result.slices[list(LABELS)].to_numpy(), expected, atol=1e-4, rtol=0)
