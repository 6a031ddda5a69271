"""The blend over candidates and the `any` post-processing, both chosen out of fold.

The candidates are LightGBM, the sequence model, each level-1 model and the level-1 mean. Per
label the blend is ``sum_c w_c p_c`` with ``w`` on the simplex (non-negative, summing to 1),
fitted to minimise that label's log loss: a convex problem (the log loss of a mixture is convex in
its weights) solved by SLSQP from the uniform mix, then compared with every single candidate, so
on the rows it is fitted on the blend is never worse than its best input. A label too rare in the
rows fitted on (MIN_CLASS_ROWS) takes the weights fitted on the other labels pooled.

`any` is at least every subtype's probability (a slice with a subtype bleeds); raising `any` to
the largest subtype probability is kept only where it lowers the loss.

Nested (``nested_blend``): fold k's weights and `any` rule are chosen on the other folds' rows
only, so the concatenated fold-k predictions are an honest OOF figure; the weights for test and
for `make predict` are then fitted on every OOF row.

The blend's form (``form``): weights per label (the default), one weight vector pooled over the
labels, the single best input, or "auto": on small sets (below FORM_CV_ROWS rows) the form chosen by
cross-validation over the folds of the rows it is fitted on, per label from FORM_CV_ROWS rows on.
Per-label weights on a thousand rows can jump between vertices from fold to fold (on a 50-patient
set one fold's subdural weight went wholly to LightGBM, the better input on the other folds and the
worse one there); the pooled and single forms have fewer choices to get wrong. "auto" is not the
default: on six competitions of real tiny-CNN outputs it did not lower the loss (README).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from competition.constants import LABELS
from competition.metric import EPS, weighted_log_loss

ANY = LABELS.index("any")
# Fewer positive (or negative) rows than this and a label borrows the pooled weights: on the demo
# (30 patients) every intraparenchymal slice lay in one fold, and fit without it LightGBM's zeros won.
MIN_CLASS_ROWS = 10
FORMS = ("best input", "pooled", "per label")  # simplest first: a tie keeps the simpler form
AUTO = "auto"
# Rows from which the blend is per label without asking (the real competition's 752k rows fit 5 x 6
# weights with room to spare, and the inner cross-validation would cost minutes); the LightGBM sizing
# switches at the same count (lgbm.FULL_SIZE_ROWS).
FORM_CV_ROWS = 200_000


def _loss_and_grad(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary log loss of the mix ``w @ p`` (p: (C, N)) and its gradient in ``w``."""
    q = w @ p
    clipped = np.clip(q, EPS, 1 - EPS)
    loss = -(y * np.log(clipped) + (1 - y) * np.log1p(-clipped)).mean()
    slope = np.where((q > EPS) & (q < 1 - EPS), (1 - y) / (1 - clipped) - y / clipped, 0.0)
    return float(loss), p @ slope / len(y)


def fit_simplex(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(C,) simplex weights minimising the mean log loss of ``w @ p`` for binary ``y`` (N,), p (C, N)."""
    n_cand = len(p)
    vertices = np.eye(n_cand)
    if n_cand == 1:
        return vertices[0]
    result = minimize(_loss_and_grad, np.full(n_cand, 1.0 / n_cand), args=(y, p), jac=True, method="SLSQP",
                      bounds=[(0.0, 1.0)] * n_cand, constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},),
                      options={"ftol": 1e-12, "maxiter": 500})
    w = np.where(result.x > 1e-9, result.x, 0.0)  # the optimiser's round-off below zero or near it: none
    w = w / w.sum() if w.sum() > 0 else vertices[0]
    # A single candidate when it is at least as good: the optimiser can stop short of a vertex.
    options = [w, *vertices]
    losses = [_loss_and_grad(v, y, p)[0] for v in options]
    return options[int(np.argmin(losses))]


def fit_simplex_weights(y: np.ndarray, candidates: np.ndarray, min_rows: int = MIN_CLASS_ROWS) -> np.ndarray:
    """(C, L) weights per label: column j minimises label j's log loss of the mix. y (N, L), candidates (C, N, L).

    A label with fewer than ``min_rows`` positive (or negative) rows cannot rank the candidates (with
    no positive at all, the lowest predictor wins); it takes the weights fitted on the other labels
    pooled (uniform where no label has enough)."""
    y, candidates = np.asarray(y, np.float64), np.asarray(candidates, np.float64)
    if candidates.ndim != 3 or candidates.shape[1:] != y.shape:
        raise ValueError(f"candidates must be (C, N, L) with (N, L) = the labels' {y.shape}, got {candidates.shape}")
    n_cand, positives = len(candidates), y.sum(axis=0)
    enough = (positives >= min_rows) & (len(y) - positives >= min_rows)
    weights = np.full((n_cand, y.shape[1]), 1.0 / n_cand)
    for j in np.flatnonzero(enough):
        weights[:, j] = fit_simplex(y[:, j], candidates[:, :, j])
    if enough.any() and not enough.all():
        weights[:, ~enough] = fit_pooled(y[:, enough], candidates[:, :, enough])[:, None]
    return weights


def fit_pooled(y: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(C,) simplex weights fitted to every label's rows of y (N, L) as one binary problem; candidates (C, N, L)."""
    y, candidates = np.asarray(y, np.float64), np.asarray(candidates, np.float64)
    return fit_simplex(y.T.ravel(), candidates.transpose(0, 2, 1).reshape(len(candidates), -1))


def check_form(form: str) -> None:
    """Refuse a blend form that is neither one of FORMS nor AUTO, naming them."""
    if form not in (*FORMS, AUTO):
        raise ValueError(f"unknown blend form {form!r}; one of {', '.join((*FORMS, AUTO))}")


def fit_form(form: str, y: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(C, L) weights of one of FORMS fitted to y (N, L) on candidates (C, N, L)."""
    n_cand, n_labels = len(candidates), y.shape[1]
    if form == "per label":
        return fit_simplex_weights(y, candidates)
    if form == "pooled":
        return np.repeat(fit_pooled(y, candidates)[:, None], n_labels, axis=1)
    if form == "best input":
        best = int(np.argmin([weighted_log_loss(y, c) for c in candidates]))
        return np.repeat(np.eye(n_cand)[best][:, None], n_labels, axis=1)
    raise ValueError(f"unknown blend form {form!r}; one of {FORMS}")


def choose_form(y: np.ndarray, folds: np.ndarray, candidates: np.ndarray) -> tuple[str, dict[str, float]]:
    """The form of FORMS whose weights, fitted for each fold on the others, score best on it (weighted log loss)."""
    losses = {}
    for form in FORMS:
        p = np.zeros(y.shape)
        for k in np.unique(folds):
            held = folds == k
            p[held] = mix(candidates[:, held], fit_form(form, y[~held], candidates[:, ~held]))
        losses[form] = weighted_log_loss(y, p)
    return min(FORMS, key=lambda f: (losses[f], FORMS.index(f))), losses


def mix(candidates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, L) blend of candidates (C, N, L) with weights (C, L)."""
    return np.einsum("cnl,cl->nl", np.asarray(candidates, np.float64), weights)


def any_at_least_subtypes(p: np.ndarray) -> np.ndarray:
    out = p.copy()
    out[:, ANY] = np.maximum(p[:, ANY], p[:, :ANY].max(axis=1))
    return out


def any_rule_gain(y: np.ndarray, p: np.ndarray) -> float:
    """Weighted log loss saved by the `any` rule on these rows (positive: it helps)."""
    return weighted_log_loss(y, p) - weighted_log_loss(y, any_at_least_subtypes(p))


@dataclass(frozen=True)
class BlendChoice:
    """Simplex weights per label over the candidates and whether the `any` rule applies."""
    names: list[str]
    weights: np.ndarray  # (C, 6)
    any_rule: bool
    any_gain: float      # the rule's gain on the rows it was chosen on
    form: str = "per label"  # one of FORMS
    form_losses: dict[str, float] = field(default_factory=dict)  # each form's cross-validated loss, where chosen

    def apply(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(blend, blend after the `any` rule) of candidates (C, N, 6)."""
        p = mix(candidates, self.weights)
        return p, any_at_least_subtypes(p) if self.any_rule else p

    def describe_form(self) -> str:
        if not self.form_losses:
            return self.form
        losses = ", ".join(f"{f} {self.form_losses[f]:.4f}" for f in FORMS)
        return f"{self.form} (chosen by cross-validation over the folds, weighted log loss: {losses})"

    def weights_table(self) -> dict[str, dict[str, float]]:
        return {name: dict(zip(LABELS, row.tolist())) for name, row in zip(self.names, self.weights)}


def choose_blend(names: list[str], y: np.ndarray, candidates: np.ndarray, folds: np.ndarray | None = None,
                 form: str = "per label") -> BlendChoice:
    """Weights and `any` rule, both chosen on these rows. ``form``: one of FORMS, or AUTO: chosen by
    cross-validation where ``folds`` (N,) gives at least two folds and there are fewer than
    FORM_CV_ROWS rows (else per label)."""
    check_form(form)
    losses = {}
    if form == AUTO:
        form = "per label"
        if folds is not None and len(np.unique(folds)) > 1 and len(y) < FORM_CV_ROWS and len(candidates) > 1:
            form, losses = choose_form(y, np.asarray(folds), candidates)
    weights = fit_form(form, y, candidates)
    gain = any_rule_gain(y, mix(candidates, weights))
    return BlendChoice(list(names), weights, gain > 0, gain, form, losses)


@dataclass(frozen=True)
class NestedBlend:
    final: BlendChoice                  # fitted on every OOF row: for test and `make predict`
    by_fold: dict[int, BlendChoice]     # fold k's, fitted on the other folds' rows
    oof_blend: np.ndarray               # (N, 6) nested blend before the `any` rule
    oof: np.ndarray                     # (N, 6) nested, after fold k's `any` rule
    in_sample_oof: np.ndarray           # (N, 6) the final choice scored on the rows it was fitted on


def nested_blend(names: list[str], y: np.ndarray, folds: np.ndarray, candidates: np.ndarray,
                 form: str = "per label") -> NestedBlend:
    """Fold k's rows predicted by the weights and rule chosen on the other folds' rows only."""
    folds = np.asarray(folds)
    oof_blend, oof = np.zeros(y.shape), np.zeros(y.shape)
    by_fold = {}
    for k in np.unique(folds):
        held = folds == k
        if held.all():
            raise ValueError(f"a nested blend needs at least two folds, got only fold {k}")
        by_fold[int(k)] = choice = choose_blend(names, y[~held], candidates[:, ~held], folds[~held], form)
        oof_blend[held], oof[held] = choice.apply(candidates[:, held])
    final = choose_blend(names, y, candidates, folds, form)
    return NestedBlend(final, by_fold, oof_blend, oof, final.apply(candidates)[1])

