"""`make demo`, smaller: the same Makefile path on a small synthetic competition, end to end.

It runs the real targets (generate, prepare, two CNNs, stack with a short Optuna study, submission,
report, summary) into tmp_path and checks that the outputs exist, that their ids align, and that
the stack beats the constant prior.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from competition.constants import LABELS
from competition.labels import read_labels
from competition.metric import prior_baseline, weighted_log_loss
from conftest import REPO

MODELS = ("tiny_resnet", "tiny_byobnet")
# Each model's OOF weighted log loss is at most this share of the constant prior's. The demo's bar
# is 0.85 on 110 patients; on these 16 patients (12 train), 4 folds and 2 epochs tiny_resnet measured
# 0.924 and tiny_byobnet 0.934 (2026-11-25, 2-core machine): 0.97 leaves room for other CPUs' numerics.
LEARNS_BOUND = 0.97
# The stack's OOF loss may exceed its best input's by this much. Measured 2026-12-05 (2 cores): stack
# 0.3758, tiny_resnet 0.3779, tiny_byobnet 0.3823 (the stack 0.002 below); the OOF prior lies ~0.03
# above the best input (LEARNS_BOUND), so a stack that learnt nothing from its inputs fails by 6x.
STACK_TOLERANCE = 0.005


def run_demo(data: Path, work: Path, subs: Path) -> subprocess.CompletedProcess:
    cmd = ["make", "--no-print-directory", "demo", f"DEMO_DATA={data}", f"WORK={work}", f"SUBMISSIONS={subs}",
           "PRESET=tiny", "PATIENTS=16", "N_FOLDS=4", f"DEMO_MODELS={' '.join(MODELS)}", "DEMO_EPOCHS=2", "DEMO_TRIALS=2",
           "DEMO_STACK=--rounds 60 --neighbours 2 --early-stopping 10 --threads 1"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data, work, subs = root / "mini", root / "work", root / "subs"
    return data, work, subs, run_demo(data, work, subs).stdout


def test_every_stage_ran_and_named_itself(demo):
    _, _, _, out = demo
    for stage in ("synthetic competition", "prepare", *(f"level 1 {m}" for m in MODELS), "stack", "report", "summary"):
        assert f">>> demo: {stage}" in out
    assert "constant prior" in out and "stacker (level 2)" in out
    assert "AUC lo" in out and "stack minus best single model by OOF" in out and "threshold chosen on" in out


def test_summary_applies_the_stacks_own_study_threshold(demo):
    """The summary recomputes the stack's OOF study threshold from its OOF slices; `make stack` chose
    it in its own study table (and `make predict` decides by it): the two must agree."""
    _, work, _, out = demo
    (line,) = [ln for ln in out.splitlines() if ln.startswith("stacker (level 2)")]
    cells = line[len("stacker (level 2)"):].split()
    threshold = json.loads((work / "stack" / "metrics.json").read_text())["study_level"]["stacker"]["threshold"]
    assert float(cells[3]) == pytest.approx(threshold, abs=5e-5)


def test_outputs_exist_and_ids_align(demo):
    data, work, subs, _ = demo
    folds = pd.read_parquet(work / "folds.parquet")
    sample_ids = pd.read_csv(data / "stage_2_sample_submission.csv")["ID"].str.rsplit("_", n=1).str[0].unique()
    for source in (*(work / "models" / m for m in MODELS), work / "stack"):
        oof = pd.read_parquet(source / "oof.parquet")
        test = pd.read_parquet(source / "test.parquet")
        assert sorted(oof["image_id"]) == sorted(folds["image_id"]), source
        assert sorted(test["image_id"]) == sorted(sample_ids), source
        assert np.isfinite(oof[list(LABELS)].to_numpy()).all()
    assert (work / "reports" / "index.html").is_file()
    submission = pd.read_csv(subs / f"{data.name}-stack.csv.gz")
    assert len(submission) == len(sample_ids) * len(LABELS)


def test_stack_beats_the_constant_prior(demo):
    _, work, _, _ = demo
    labels = pd.read_parquet(work / "labels.parquet")
    oof = pd.read_parquet(work / "stack" / "oof.parquet")[["image_id", *LABELS]]
    folds = pd.read_parquet(work / "folds.parquet")[["image_id", "fold"]]
    table = oof.merge(folds, on="image_id", validate="one_to_one").merge(labels, on="image_id", suffixes=("_pred", ""))
    y = table[list(LABELS)].to_numpy(float)
    pred = table[[f"{c}_pred" for c in LABELS]].to_numpy(float)
    prior = np.empty_like(y)
    for fold in table["fold"].unique():  # the prior as the stack sees it: rates of the other folds
        val = (table["fold"] == fold).to_numpy()
        prior[val] = prior_baseline(y[~val], int(val.sum()))
    assert weighted_log_loss(y, pred) < weighted_log_loss(y, prior)


def scores_on_test(work: Path, data: Path, subs: Path, models) -> dict[str, float]:
    """Test weighted log loss of each level-1 model, the stack's submission file and the prior."""
    from competition.synthetic import score_submission

    y = read_labels(data / "stage_2_test_answers.csv").set_index("image_id")[list(LABELS)]
    scores = {m: weighted_log_loss(y.to_numpy(float), pd.read_parquet(work / "models" / m / "test.parquet")
                                   .set_index("image_id").loc[y.index, list(LABELS)].to_numpy(float))
              for m in models}
    train = pd.read_parquet(work / "labels.parquet")[list(LABELS)].to_numpy(float)
    scores["prior"] = weighted_log_loss(y.to_numpy(float), prior_baseline(train, len(y)))
    submission = subs / f"{data.name}-stack.csv.gz"
    scores["stack"] = score_submission(submission, data / "stage_2_test_answers.csv")["weighted_log_loss"]
    return scores


def test_submission_scores_against_the_answers(demo):
    """On 4 test patients the stack's edge over its best input is noise (measured +0.003 and -0.004
    on two versions of the same code), so here only the prior must be beaten; the full-size demo
    below must beat the best model too."""
    data, work, subs, out = demo
    scores = scores_on_test(work, data, subs, MODELS)
    assert 0 < scores["stack"] < scores["prior"], scores
    assert f"{scores['stack']:.4f}" in out


@pytest.mark.slow
def test_the_full_demo_holds_every_claim_of_its_table(tmp_path):
    """`make demo` as a newcomer runs it (110 patients, 3 CNNs, ~17 min on 2 cores): every CNN's
    OOF loss at most 0.9 x the prior's (2026-12-05: 0.69, 0.73 and 0.86; tiny_efficientnet was at
    0.85 while every epoch's validation used hflip TTA, which no longer chooses its best epoch); on test the stack beats every single model and the prior,
    and the paired bootstrap interval of (stack - best model by OOF) lies below zero."""
    import re

    data, work, subs = tmp_path / "synthetic", tmp_path / "work", tmp_path / "subs"
    result = subprocess.run(["make", "--no-print-directory", "demo", f"DEMO_DATA={data}", f"WORK={work}",
                             f"SUBMISSIONS={subs}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    models = [d.name for d in (work / "models").iterdir() if d.is_dir()]
    assert len(models) == 3
    for model in models:
        assert oof_share_of_prior(work, model) <= 0.9, model
    scores = scores_on_test(work, data, subs, models)
    assert scores["stack"] < min(scores[m] for m in [*models, "prior"]), scores
    interval = re.search(r"stack minus best single model by OOF .* 95% interval \[([-+.\d]+), ([-+.\d]+)\]",
                         result.stdout)
    assert interval is not None and float(interval.group(2)) < 0, interval


def oof_share_of_prior(work: Path, model: str) -> float:
    """A model's OOF weighted log loss over the prior's (each fold predicted by the others' label rates)."""
    labels = pd.read_parquet(work / "labels.parquet")
    oof = pd.read_parquet(work / "models" / model / "oof.parquet")[["image_id", *LABELS]]
    folds = pd.read_parquet(work / "folds.parquet")[["image_id", "fold"]]
    table = oof.merge(folds, on="image_id", validate="one_to_one").merge(labels, on="image_id", suffixes=("_pred", ""))
    y = table[list(LABELS)].to_numpy(float)
    prior = np.empty_like(y)
    for fold in table["fold"].unique():
        val = (table["fold"] == fold).to_numpy()
        prior[val] = prior_baseline(y[~val], int(val.sum()))
    pred = table[[f"{c}_pred" for c in LABELS]].to_numpy(float)
    return weighted_log_loss(y, pred) / weighted_log_loss(y, prior)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_beats_the_prior(demo, model):
    _, work, _, _ = demo
    assert oof_share_of_prior(work, model) <= LEARNS_BOUND


def test_a_second_demo_reuses_every_finished_stage(demo):
    """Nothing changed: the dataset, each finished model, its plots and the report are kept as they
    are (the files keep their modification times); the summary is printed again."""
    data, work, subs, _ = demo
    kept = [p for m in MODELS for p in (work / "models" / m).glob("*") if p.is_file()]
    kept += [p for p in (work / "reports").rglob("*") if p.is_file()]
    kept += [p for p in (work / "stack").rglob("*") if p.is_file() and p.suffix in (".parquet", ".json", ".txt", ".pt")]
    before = {p: p.stat().st_mtime_ns for p in kept}
    result = run_demo(data, work, subs)
    out = result.stdout + result.stderr
    assert "complete already" in out
    for model in MODELS:
        assert f"{model}: every fold finished earlier and oof.parquet / test.parquet are up to date" in out
    assert "index.html: up to date" in out and "stack minus best single model by OOF" in out
    assert "stack: up to date (no level-1 output" in out
    assert {p: p.stat().st_mtime_ns for p in kept} == before


def _oof_loss(work: Path, source: Path) -> float:
    labels = pd.read_parquet(work / "labels.parquet").set_index("image_id")
    oof = pd.read_parquet(source / "oof.parquet").set_index("image_id")
    return weighted_log_loss(labels[list(LABELS)].to_numpy(float), oof.loc[labels.index, list(LABELS)].to_numpy(float))


def test_stack_on_real_cnn_outputs_is_no_worse_than_its_best_input(demo):
    """The learning claim on real level-1 outputs, in the fast suite: two tiny CNNs trained by the
    real loop (`make oof` through `make demo`), then level 2 on their OOF predictions. The stack's
    OOF weighted log loss is at most its best input's plus STACK_TOLERANCE."""
    _, work, _, _ = demo
    inputs = {m: _oof_loss(work, work / "models" / m) for m in MODELS}
    stack = _oof_loss(work, work / "stack")
    print(f"OOF weighted log loss: stack {stack:.4f}, inputs {inputs}")
    assert stack <= min(inputs.values()) + STACK_TOLERANCE, (stack, inputs)
