"""Neighbour-slice and study features against a brute-force loop over each series and study."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from competition.constants import LABELS
from features.tabular import (
    TabularFeatureConfig,
    TabularFeatureError,
    build_tabular_features,
    feature_names,
)


def fabricate(seed: int = 0, n_studies: int = 12) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Metadata of studies with one or two series of 1..14 slices (some with gaps), shuffled,
    and two models' probabilities, one of them coarse so that ties occur within a study."""
    rng = np.random.default_rng(seed)
    rows = []
    for st in range(n_studies):
        for se in range(1 + (st % 3 == 0)):
            n = int(rng.integers(1, 15))
            kept = np.sort(rng.choice(n + 2, size=n, replace=False))  # gaps: dropped slices
            for idx in kept:
                rows.append(
                    dict(image_id=f"ID_{len(rows):09x}", study_id=f"study{st}", series_id=f"series{st}_{se}",
                         slice_index=int(idx), n_slices=n + 2, patient_id=f"patient{st}")
                )
    meta = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    meta["brain_ratio"] = rng.random(len(meta)).astype(np.float32)
    n = len(meta)
    order = rng.permutation(n)  # predictions in yet another order than the metadata
    a = pd.DataFrame(rng.random((n, 6)), columns=list(LABELS))
    b = pd.DataFrame(np.round(rng.random((n, 6)), 1), columns=list(LABELS))
    preds = {}
    for name, p in (("cnn_a", a), ("cnn_b", b)):
        p.insert(0, "image_id", meta["image_id"].to_numpy()[order])
        preds[name] = p
    return meta, preds


def brute_force(meta: pd.DataFrame, preds: dict[str, pd.DataFrame], cfg: TabularFeatureConfig) -> pd.DataFrame:
    """The same features one series / one study at a time, with pandas and plain loops."""
    k = cfg.k_neighbours
    ids = preds[next(iter(preds))]["image_id"]
    records: dict[str, dict[str, float]] = {i: {} for i in ids}
    m = meta.set_index("image_id")
    for image_id in ids:
        r = m.loc[image_id]
        records[image_id]["pos_rel"] = r.slice_index / (r.n_slices - 1) if r.n_slices > 1 else 0.5
        records[image_id]["series_len"] = r.n_slices
        records[image_id]["study_len"] = int((m["study_id"] == r.study_id).sum())
    for _, series in meta.groupby("series_id"):
        b = series.sort_values("slice_index")["brain_ratio"].tolist()
        for i, image_id in enumerate(series.sort_values("slice_index")["image_id"]):
            records[image_id]["brain_ratio"] = b[i]
            for d in (1, 2):
                records[image_id][f"brain_ratio_prev{d}"] = b[i - d] if i - d >= 0 else np.nan
                records[image_id][f"brain_ratio_next{d}"] = b[i + d] if i + d < len(b) else np.nan
    for model, table in preds.items():
        t = table.merge(meta, on="image_id")
        for label in LABELS:
            pre = f"{model}__{label}__"
            for _, series in t.groupby("series_id"):
                series = series.sort_values("slice_index")
                v = series[label].tolist()
                for i, image_id in enumerate(series["image_id"]):
                    rec = records[image_id]
                    rec[pre + "self"] = v[i]
                    for d in range(1, k + 1):
                        prev = v[i - d] if i - d >= 0 else np.nan
                        nxt = v[i + d] if i + d < len(v) else np.nan
                        rec[pre + f"prev{d}"], rec[pre + f"next{d}"] = prev, nxt
                        rec[pre + f"diff_prev{d}"], rec[pre + f"diff_next{d}"] = v[i] - prev, v[i] - nxt
                    for d in cfg.any_shifts if label == "any" else ():
                        rec[pre + f"prev{d}"] = v[i - d] if i - d >= 0 else np.nan
                        rec[pre + f"next{d}"] = v[i + d] if i + d < len(v) else np.nan
                roll = pd.Series(v)
                for w in cfg.rolling_windows:
                    means = roll.rolling(w, center=True, min_periods=1).mean()
                    maxes = roll.rolling(w, center=True, min_periods=1).max()
                    for i, image_id in enumerate(series["image_id"]):
                        records[image_id][pre + f"roll_mean{w}"] = means.iloc[i]
                        records[image_id][pre + f"roll_max{w}"] = maxes.iloc[i]
            for _, study in t.groupby("study_id"):
                v = study[label].to_numpy()
                ranks = study[label].rank(pct=True).to_numpy()
                for i, image_id in enumerate(study["image_id"]):
                    rec = records[image_id]
                    rec[pre + "study_max"] = v.max()
                    rec[pre + "study_mean"] = v.mean()
                    rec[pre + "study_std"] = v.std(ddof=0)
                    for q, tag in zip(cfg.quantiles, ("75", "90", "95")):
                        rec[pre + f"study_q{tag}"] = np.quantile(v, q)
                    for th, tag in zip(cfg.thresholds, ("10", "50", "90")):
                        rec[pre + f"study_n_gt{tag}"] = float((v > th).sum())
                    rec[pre + "study_rank"] = ranks[i]
    out = pd.DataFrame.from_dict(records, orient="index")
    out.index.name = "image_id"
    return out.reset_index()


@pytest.mark.parametrize("k, windows, row_order, diffs, any_shifts, brain", [
    (5, (3, 5, 9), "input", True, (), False), (2, (7, 3), "series", False, (), True), (0, (3,), "input", True, (), True),
    (3, (3, 21), "input", False, (6, 11), False), (1, (9,), "series", True, (10, 4), True),
])
def test_features_equal_brute_force(k: int, windows: tuple[int, ...], row_order: str, diffs: bool,
                                    any_shifts: tuple[int, ...], brain: bool) -> None:
    meta, preds = fabricate(seed=k)
    cfg = TabularFeatureConfig(k_neighbours=k, rolling_windows=windows, diffs=diffs, any_shifts=any_shifts,
                               brain_ratio=brain)
    fast = build_tabular_features(preds, meta, cfg, row_order=row_order)
    slow = brute_force(meta, preds, cfg)
    assert list(fast.columns) == ["image_id", *feature_names(["cnn_a", "cnn_b"], cfg)]
    if row_order == "input":
        assert fast["image_id"].tolist() == preds["cnn_a"]["image_id"].tolist()
    else:
        # Each series one contiguous run of rows, slices in increasing slice_index.
        series = meta.set_index("image_id").loc[fast["image_id"], ["series_id", "slice_index"]]
        runs = (series["series_id"] != series["series_id"].shift()).sum()
        assert runs == series["series_id"].nunique()
        assert (series.groupby("series_id", sort=False)["slice_index"].diff().dropna() > 0).all()
    slow = slow.set_index("image_id").loc[fast["image_id"], fast.columns[1:]]
    np.testing.assert_allclose(fast.iloc[:, 1:].to_numpy(np.float64), slow.to_numpy(np.float64), rtol=1e-5, atol=1e-6)


def test_missing_neighbours_are_nan_not_zero() -> None:
    meta = pd.DataFrame(dict(image_id=["ID_a", "ID_b"], study_id="s", series_id="s", slice_index=[0, 1], n_slices=2))
    p = pd.DataFrame({"image_id": ["ID_b", "ID_a"], **{c: [0.2, 0.4] for c in LABELS}})
    f = build_tabular_features({"m": p}, meta, TabularFeatureConfig(k_neighbours=2, rolling_windows=(3,), diffs=True)).set_index("image_id")
    assert f.loc["ID_a", "m__any__next1"] == pytest.approx(0.2)
    assert np.isnan(f.loc["ID_a", "m__any__prev1"]) and np.isnan(f.loc["ID_a", "m__any__next2"])
    assert np.isnan(f.loc["ID_b", "m__any__diff_next1"])
    assert f.loc["ID_b", "m__any__diff_prev1"] == pytest.approx(-0.2)
    assert f.loc["ID_a", "pos_rel"] == 0.0 and f.loc["ID_b", "pos_rel"] == 1.0


def test_bad_inputs_are_named() -> None:
    meta, preds = fabricate()
    with pytest.raises(TabularFeatureError, match="lacks the 'brain_ratio' column"):
        build_tabular_features(preds, meta.drop(columns="brain_ratio"), TabularFeatureConfig(brain_ratio=True))
    shuffled = {"cnn_a": preds["cnn_a"], "cnn_b": preds["cnn_b"].iloc[::-1]}
    with pytest.raises(TabularFeatureError, match="cnn_b: image_id rows differ"):
        build_tabular_features(shuffled, meta)
    with pytest.raises(TabularFeatureError, match="not in the metadata"):
        build_tabular_features(preds, meta.iloc[1:])
    nan = preds["cnn_a"].copy()
    nan.loc[3, "any"] = np.nan
    with pytest.raises(TabularFeatureError, match="cnn_a: predictions contain NaN"):
        build_tabular_features({"cnn_a": nan}, meta)
    with pytest.raises(TabularFeatureError, match="odd"):
        TabularFeatureConfig(rolling_windows=(4,))
