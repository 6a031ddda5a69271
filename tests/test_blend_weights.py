"""The blend and the `any` rule of level2_stacking/blend.py against brute-force loops and sklearn."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss

from level2_stacking.blend import any_at_least_subtypes, fit_simplex_weights, mix


def _probs(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.3).astype(float)
    # Below 0.5: a mix whose weights do not sum to one is not clipped back into [0, 1].
    a = np.clip(0.4 * y + 0.1 * rng.random((n, 6)), 0.01, 0.49)  # a good stacker
    b = np.clip(0.25 * y + 0.25 * rng.random((n, 6)), 0.01, 0.49)  # a weaker one
    return y, a, b


def test_two_candidate_weights_are_at_least_as_good_as_a_fine_grid():
    """The log loss of a convex mix is convex in its weight: the fitted weight of ``a`` (continuous,
    SLSQP) must reach the minimum of a brute-force grid of 0.01 steps, to the grid's resolution."""
    y, a, b = _probs(0)
    a[:, 3] = b[:, 3]  # a tie on one label: any weight is as good
    b[:, 4], a[:, 4] = a[:, 4].copy(), b[:, 4].copy()  # the better one on the other side for another (copies: views would alias)
    weights = fit_simplex_weights(y, np.stack([a, b]))
    np.testing.assert_allclose(weights.sum(axis=0), 1.0)
    got = weights[0]
    grid = np.linspace(0.0, 1.0, 101)
    for j in range(6):
        losses = [log_loss(y[:, j], w * a[:, j] + (1 - w) * b[:, j], labels=[0, 1]) for w in grid]
        fitted = log_loss(y[:, j], got[j] * a[:, j] + (1 - got[j]) * b[:, j], labels=[0, 1])
        assert 0.0 <= got[j] <= 1.0 and fitted <= min(losses) + 1e-6, f"label {j}"
    assert got[0] > 0.5 and got[4] < 0.5


def test_mix_is_the_convex_mix_per_label():
    _, a, b = _probs(1, n=50)
    w = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 0.4])
    want = np.array([[w[j] * a[i, j] + (1 - w[j]) * b[i, j] for j in range(6)] for i in range(len(a))])
    np.testing.assert_allclose(mix(np.stack([a, b]), np.stack([w, 1 - w])), want, rtol=1e-12)


def test_any_rule_raises_any_to_each_rows_own_largest_subtype():
    rng = np.random.default_rng(2)
    p = rng.random((30, 6)) * 0.5
    got = any_at_least_subtypes(p)
    for i in range(len(p)):
        assert got[i, 5] == max(p[i, 5], *p[i, :5])
        np.testing.assert_array_equal(got[i, :5], p[i, :5])
    assert (got[:, 5] < p[:, :5].max()).any()  # rows differ: not one maximum over the whole table
