"""Patient (study) level diagnosis against brute-force pooling and sklearn's metrics."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score, roc_curve

from competition.constants import LABELS
from competition.metric import weighted_log_loss
from competition.study_level import (
    bootstrap_auc,
    oof_threshold_on_test,
    paired_bootstrap_difference,
    study_level_report,
    study_probability,
    study_report_from_slices,
    study_truth,
    threshold_for_sensitivity,
)


def fabricate(n_studies: int = 60, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    meta, slices, labels = [], [], []
    for s in range(n_studies):
        n = int(rng.integers(1, 12))
        positive = rng.random() < 0.4
        for i in range(n):
            image = f"ID_{len(meta):09x}"
            y = int(positive and i >= n // 2)
            meta.append({"image_id": image, "study_id": f"study{s:03d}"})
            slices.append({"image_id": image, "any": float(np.clip(0.5 * y + rng.random() * 0.6, 0, 1))})
            labels.append({"image_id": image, "any": y})
    order = rng.permutation(len(meta))
    return pd.DataFrame(meta).iloc[order], pd.DataFrame(slices), pd.DataFrame(labels).iloc[order[::-1]]


@pytest.mark.parametrize("pooling", ["max", "top3_mean", "noisy_or"])
def test_study_probability_equals_a_loop(pooling: str) -> None:
    meta, slices, _ = fabricate()
    got = study_probability(slices, meta, pooling)
    study_of = dict(zip(meta["image_id"], meta["study_id"]))
    expected: dict[str, list[float]] = {}
    for image, p in zip(slices["image_id"], slices["any"]):
        expected.setdefault(study_of[image], []).append(p)
    for study, ps in expected.items():
        ps = sorted(ps, reverse=True)
        want = {"max": ps[0], "top3_mean": sum(ps[:3]) / len(ps[:3]), "noisy_or": 1 - np.prod([1 - p for p in ps])}[pooling]
        assert got[study] == pytest.approx(want)
    assert len(got) == len(expected) and list(got.index) == sorted(expected)


def test_threshold_is_the_highest_reaching_the_target_as_in_roc_curve() -> None:
    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.3
    score = np.where(y, rng.beta(4, 2, 300), rng.beta(2, 4, 300))
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    for target in (0.5, 0.8, 0.95, 1.0):
        t = threshold_for_sensitivity(y, score, target)
        assert t == pytest.approx(thresholds[np.argmax(tpr >= target - 1e-12)])
        assert recall_score(y, score >= t) >= target


def test_report_equals_sklearn_metrics() -> None:
    meta, slices, labels = fabricate(seed=4)
    prob = study_probability(slices, meta)
    truth = study_truth(labels, meta).reindex(prob.index)
    report = study_level_report(truth.to_numpy(), prob.to_numpy(), target_sensitivity=0.9)
    pred = prob.to_numpy() >= report["threshold"]
    assert report["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert report["sensitivity"] == pytest.approx(recall_score(truth, pred))
    assert report["specificity"] == pytest.approx(recall_score(truth, pred, pos_label=0))
    assert report["roc_auc"] == pytest.approx(roc_auc_score(truth, prob))
    assert report["sensitivity"] >= 0.9
    assert report["n_studies"] == meta["study_id"].nunique() and report["n_positive"] == int(truth.sum())
    assert study_report_from_slices(slices, labels, meta, target_sensitivity=0.9) == report
    fixed = study_level_report(truth.to_numpy(), prob.to_numpy(), threshold=0.5)
    assert fixed["threshold"] == 0.5 and fixed["accuracy"] == pytest.approx(accuracy_score(truth, prob >= 0.5))


def test_bad_inputs() -> None:
    meta, slices, _ = fabricate()
    with pytest.raises(ValueError, match="unknown pooling 'mean'"):
        study_probability(slices, meta, "mean")
    with pytest.raises(ValueError, match=r"1 image\(s\) have no study_id"):
        study_probability(slices, meta.iloc[1:])
    with pytest.raises(ValueError, match="no positive study"):
        threshold_for_sensitivity(np.zeros(3), np.ones(3))


def test_ties_with_the_threshold_count_as_positive() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    score = np.array([0.9, 0.4, 0.4, 0.4, 0.8, 0.1])
    report = study_level_report(y, score, target_sensitivity=1.0)
    assert report["threshold"] == 0.4
    assert report["sensitivity"] == 1.0 and report["specificity"] == pytest.approx(1 / 3)  # two tied negatives flagged


def _draws(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # the draws the functions make


def test_bootstrap_auc_equals_sklearn_in_a_loop() -> None:
    rng = np.random.default_rng(5)
    y = rng.random(40) < 0.35
    score = np.round(np.where(y, rng.beta(3, 2, 40), rng.beta(2, 3, 40)), 1)  # rounded: ties on purpose
    aucs = [roc_auc_score(y[i], score[i]) if 0 < y[i].sum() < len(i) else np.nan for i in _draws(40, 300, 7)]
    want = np.nanpercentile(aucs, [2.5, 97.5])
    assert bootstrap_auc(y, score, n_boot=300, seed=7) == pytest.approx(tuple(want))
    low, high = bootstrap_auc(y, score, n_boot=300, seed=7)
    assert low < roc_auc_score(y, score) < high
    assert np.isnan(bootstrap_auc(np.ones(5), np.arange(5.0))[0])


def test_paired_bootstrap_difference_equals_a_loop_over_studies() -> None:
    rng = np.random.default_rng(3)
    groups = np.repeat([f"s{k}" for k in range(25)], rng.integers(1, 8, 25))
    n = len(groups)
    y = (rng.random((n, len(LABELS))) < 0.2).astype(float)
    a = np.clip(0.6 * y + 0.3 * rng.random(y.shape), 0.01, 0.99)
    b = np.clip(0.3 * y + 0.5 * rng.random(y.shape), 0.01, 0.99)
    diff, low, high = paired_bootstrap_difference(groups, y, a, b, n_boot=200, seed=1)
    assert diff == pytest.approx(weighted_log_loss(y, a) - weighted_log_loss(y, b))
    studies = pd.unique(groups)
    loop = []
    for draw in _draws(len(studies), 200, 1):
        rows = np.concatenate([np.flatnonzero(groups == studies[k]) for k in draw])
        loop.append(weighted_log_loss(y[rows], a[rows]) - weighted_log_loss(y[rows], b[rows]))
    assert (low, high) == pytest.approx(tuple(np.percentile(loop, [2.5, 97.5])))
    assert low < diff < high < 0  # a knows the labels better


def test_oof_threshold_is_applied_unchanged_to_test() -> None:
    meta_oof, oof, labels_oof = fabricate(seed=6)
    meta_test, test, labels_test = fabricate(n_studies=40, seed=8)
    meta_test = meta_test.assign(study_id="t" + meta_test["study_id"])
    test["image_id"] = "T" + test["image_id"]
    labels_test["image_id"] = "T" + labels_test["image_id"]
    meta_test["image_id"] = "T" + meta_test["image_id"]
    meta = pd.concat([meta_oof, meta_test])
    got = oof_threshold_on_test(oof, labels_oof, test, labels_test, meta, target_sensitivity=0.9, n_boot=200)
    # brute force: the highest OOF study score whose call keeps >= 90% of the OOF positive studies
    p_oof, y_oof = study_probability(oof, meta), study_truth(labels_oof, meta)
    candidates = [t for t in sorted(p_oof, reverse=True) if recall_score(y_oof, p_oof >= t) >= 0.9]
    assert got["threshold"] == candidates[0]
    p_test, y_test = study_probability(test, meta), study_truth(labels_test, meta)
    assert got["sensitivity"] == pytest.approx(recall_score(y_test, p_test >= candidates[0]))
    assert got["specificity"] == pytest.approx(recall_score(y_test, p_test >= candidates[0], pos_label=0))
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y_test, p_test))
    assert got["auc_low"] <= got["roc_auc"] <= got["auc_high"]
    assert (got["n_studies"], got["oof_studies"]) == (40, 60) and got["oof_positive"] == int(y_oof.sum())
