"""What a rehearsal competition looks like: counts, series lengths and label shares of the real one.

The 2019 competition (stage 2) has 752,803 train and 121,232 test images. The positive counts per
label are those of the real stage_2_train.csv (as quoted by the competition's public EDA
notebooks; not re-checked against the file here): epidural 3,145 (0.42%), intraparenchymal
36,118 (4.80%), intraventricular 26,205 (3.48%), subarachnoid 35,675 (4.74%), subdural 47,166
(6.27%), any 107,933 (14.34%). The test set is labelled with the same shares.

Series lengths (slices per series): 85% of series draw from a normal of mean 32, sd 4, clipped to
[24, 40]; 15% from a uniform over [41, 60] (long, thin-slice or two-part series). Mean about 34.6
slices, as the real 874k images over about 25k series; median 32.
"""
from __future__ import annotations

import numpy as np

from competition.constants import LABELS, SUBTYPES

REAL_TRAIN, REAL_TEST = 752_803, 121_232
REAL_POSITIVES = {"epidural": 3_145, "intraparenchymal": 36_118, "intraventricular": 26_205,
                  "subarachnoid": 35_675, "subdural": 47_166, "any": 107_933}
SHARES = {name: REAL_POSITIVES[name] / REAL_TRAIN for name in LABELS}
SHORT_SHARE, SHORT_MEAN, SHORT_SD, SHORT_RANGE, LONG_RANGE = 0.85, 32.0, 4.0, (24, 40), (41, 60)
FOLLOWUP_RATE = 0.16  # chance that a patient has another study, as competition.synthetic's plan


def counts(scale: float) -> tuple[int, int]:
    """Train and test images at this scale (at least one shortest series each)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale {scale}: choose 0 < SCALE <= 1 (1 is the real competition's count)")
    return max(SHORT_RANGE[0], round(REAL_TRAIN * scale)), max(SHORT_RANGE[0], round(REAL_TEST * scale))


def series_lengths(total: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths drawn from the stated distribution until they sum to exactly `total`."""
    lengths: list[int] = []
    left = total
    while left > 0:
        if rng.random() < SHORT_SHARE:
            n = int(np.clip(round(rng.normal(SHORT_MEAN, SHORT_SD)), *SHORT_RANGE))
        else:
            n = int(rng.integers(LONG_RANGE[0], LONG_RANGE[1] + 1))
        if left - n < SHORT_RANGE[0]:  # near the end: the last two stay within [24, 60]
            n = left if left <= LONG_RANGE[1] else left - SHORT_RANGE[0]
        lengths.append(n)
        left -= n
    return np.asarray(lengths, dtype=np.int64)


def draw_labels(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(images, 6) uint8 labels, series after series, with exactly round(share x images) positives
    per label: each positive series has one contiguous run of `any`, every slice of it carries a
    primary subtype, and the rest of each subtype's count is laid over other series' runs."""
    total = int(lengths.sum())
    y = np.zeros((total, len(LABELS)), np.uint8)
    target = {name: round(SHARES[name] * total) for name in LABELS}
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    runs: list[tuple[int, int]] = []  # (first image, length) of each positive series' run
    left = target["any"]
    for i in rng.permutation(len(lengths)):
        if left == 0:
            break
        n = min(left, max(1, round(lengths[i] * rng.uniform(0.2, 0.6))))
        first = starts[i] + int(rng.integers(0, lengths[i] - n + 1))
        runs.append((first, n))
        left -= n
    sub = {t: i for i, t in enumerate(SUBTYPES)}
    quota = {t: target[t] for t in SUBTYPES}
    for first, n in runs:  # primary subtypes: the largest quota left, split over two when none fits
        at = first
        while at < first + n:
            t = max(quota, key=quota.get)
            k = min(first + n - at, quota[t])
            y[at:at + k, sub[t]] = 1
            quota[t] -= k
            at += k
    run_of = np.full(total, -1)
    for r, (first, n) in enumerate(runs):
        run_of[first:first + n] = r
    for t in SUBTYPES:  # companions: the rest of each count, as sub-runs of runs without t
        for r in rng.permutation(len(runs)):
            if quota[t] == 0:
                break
            first, n = runs[r]
            if y[first:first + n, sub[t]].any():
                continue
            k = min(quota[t], max(1, round(n * rng.uniform(0.3, 1.0))))
            at = first + int(rng.integers(0, n - k + 1))
            y[at:at + k, sub[t]] = 1
            quota[t] -= k
        if quota[t]:  # rare: fill single free slices of the runs
            free = np.flatnonzero((run_of >= 0) & (y[:, sub[t]] == 0))[: quota[t]]
            y[free, sub[t]] = 1
            quota[t] -= len(free)
    y[:, -1] = y[:, :-1].max(axis=1)
    return y
