"""The competition metric against sklearn's log_loss and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss

from competition.constants import LABEL_WEIGHTS, LABELS
from competition.metric import per_label_log_loss, prior_baseline, weighted_log_loss


def test_weighted_log_loss_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(0)
    y = (rng.random((500, 6)) < 0.2).astype(int)
    p = rng.uniform(0.01, 0.99, size=(500, 6))
    weights = np.tile(LABEL_WEIGHTS, (500, 1))
    expected = log_loss(y.ravel(), p.ravel(), sample_weight=weights.ravel(), labels=[0, 1])
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_equals_sklearn_clipped_as_kaggle_did_with_literal_weights():
    """Independent of the module's constants: Kaggle's log loss clipped at 1e-15, `any` (last) weighs 2."""
    rng = np.random.default_rng(2)
    y = (rng.random((400, 6)) < 0.3).astype(int)
    p = rng.uniform(0.0, 1.0, size=(400, 6))
    p[:40] = np.where(y[:40] == 1, 0.0, 1.0)  # confident mistakes: clipping decides their loss
    p[40:80] = y[40:80].astype(float)  # confident hits, exactly 0 and 1
    p[80:90] = 1e-9  # inside the competition's clip, outside a coarser one
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    weights = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    per_label = [log_loss(y[:, j], clipped[:, j], labels=[0, 1]) for j in range(6)]
    expected = float(np.dot(weights / weights.sum(), per_label))
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-9)


def test_per_label_equals_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random((300, 6)) < 0.3).astype(int)
    p = rng.uniform(0.05, 0.95, size=(300, 6))
    got = per_label_log_loss(y, p)
    assert list(got) == list(LABELS)
    for i, label in enumerate(LABELS):
        assert got[label] == pytest.approx(log_loss(y[:, i], p[:, i], labels=[0, 1]), rel=1e-12)


KAGGLE_EPS = 1e-15  # Kaggle's own clip, written here rather than read from the module under test


def test_hand_computed_cases():
    y = np.zeros((1, 6))
    assert weighted_log_loss(y, np.full((1, 6), 0.5)) == pytest.approx(math.log(2))
    # Only `any` wrong at 0.9 against truth 0: its loss -ln(0.1) counts twice out of 7 weights.
    p = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.9]])
    expected = (5 * -math.log(1 - KAGGLE_EPS) + 2 * -math.log(0.1)) / 7
    assert weighted_log_loss(y, p) == pytest.approx(expected)


def test_clipping_keeps_confident_mistakes_finite():
    y = np.ones((2, 6))
    p = np.zeros((2, 6))
    assert weighted_log_loss(y, p) == pytest.approx(-math.log(KAGGLE_EPS))
    assert weighted_log_loss(y, np.ones((2, 6))) < 1e-6


def test_shape_and_nan_errors():
    with pytest.raises(ValueError, match="LABELS order"):
        weighted_log_loss(np.zeros((3, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        weighted_log_loss(np.zeros((1, 6)), np.full((1, 6), np.nan))


def test_prior_baseline_is_the_training_rate():
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    prior = prior_baseline(y, 3)
    np.testing.assert_allclose(prior, np.tile([0.25, 0, 0.25, 0, 0, 0.5], (3, 1)))
    # The prior beats a constant 0.5 on the data it was fitted to.
    assert weighted_log_loss(y, prior_baseline(y, 4)) < weighted_log_loss(y, np.full((4, 6), 0.5))


def test_a_given_eps_is_the_clip_used():
    """weighted and per-label losses clip at the eps they are given (sklearn's clip as reference)."""
    y = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 1]])
    p = np.array([[0.0, 1.0, 0.3, 0.0, 1.0, 0.9], [1.0, 0.0, 0.2, 0.1, 0.0, 1.0]])
    eps = 1e-7
    clipped = np.clip(p, eps, 1 - eps)
    per_label = [log_loss(y[:, j], clipped[:, j], labels=[0, 1]) for j in range(6)]
    assert list(per_label_log_loss(y, p, eps=eps).values()) == pytest.approx(per_label, rel=1e-9)
    weights = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    assert weighted_log_loss(y, p, eps=eps) == pytest.approx(float(np.dot(weights / 7, per_label)), rel=1e-9)


def test_float32_and_integer_inputs_score_as_float64():
    """A float32 prediction of exactly 1 against a 0: 1 - 1e-15 rounds to 1 in float32, so the
    loss must be computed in float64 to stay the clipped 34.5 nats instead of infinite."""
    y = np.zeros((1, 6), dtype=np.int8)
    p = np.ones((1, 6), dtype=np.float32)
    expected = -math.log1p(-np.float64(1 - KAGGLE_EPS))  # 1 - 1e-15 as float64 holds it (34.54 nats)
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-9)
    assert np.isfinite(list(per_label_log_loss(y, p).values())).all()
