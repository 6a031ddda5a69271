"""A PNG contact sheet: for each subtype, one positive study's slices around its largest bleed,
in the brain window (40/80), so a person can check that bleeds look like what their labels claim."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from competition.constants import SUBTYPES
from competition.dicom import read_hu
from competition.synthetic.dataset import ANSWERS, TRUTH_DIR

SHORT = {"epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH", "subarachnoid": "SAH",
         "subdural": "SDH"}
COLOURS = {"epidural": "tab:red", "intraparenchymal": "tab:orange", "intraventricular": "tab:green",
           "subarachnoid": "tab:cyan", "subdural": "tab:purple"}


def _labels(data: Path) -> pd.DataFrame:
    from competition.labels import read_labels

    tables = [read_labels(data / "stage_2_train.csv")]
    if (data / ANSWERS).is_file():
        tables.append(read_labels(data / ANSWERS))
    return pd.concat(tables, ignore_index=True).set_index("image_id")


def contact_sheet(
    data_dir: Path | str,
    out_png: Path | str,
    *,
    columns: int = 7,
    window: tuple[float, float] = (40.0, 80.0),
    outline: bool = False,
    seed: int = 0,
) -> Path:
    """Write the sheet: one row per subtype, `columns` consecutive slices of one study each.

    The study is the one where the subtype is largest while showing the fewest other subtypes.
    Tiles of positive slices carry their labels in the subtype's colour; with `outline`, the truth
    masks are drawn too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, out_png = Path(data_dir), Path(out_png)
    index_csv = data / TRUTH_DIR / "index.csv"
    if not index_csv.is_file():
        raise FileNotFoundError(f"{index_csv} not found: {data} is not a synthetic dataset (run `make synthetic`)")
    index = pd.read_csv(index_csv)
    series = pd.read_csv(data / TRUTH_DIR / "series.csv").set_index("series_id")
    labels = _labels(data)
    rng = np.random.default_rng(seed)

    lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    fig, axes = plt.subplots(len(SUBTYPES), columns, figsize=(2.2 * columns, 2.4 * len(SUBTYPES)), squeeze=False)
    for row, subtype in enumerate(SUBTYPES):
        for ax in axes[row]:
            ax.axis("off")
        hits = index[(index[subtype] == 1) & (index["row"] >= 0)]
        if hits.empty:
            axes[row, 0].set_title(f"{subtype}: none", fontsize=8)
            continue
        per_series = hits.groupby("series_id").agg(area=(f"area_mm2_{subtype}", "max"))
        others = series.loc[per_series.index, "subtypes"].fillna("").str.count(";")
        per_series["score"] = per_series["area"] / (1 + others) + rng.uniform(0, 1e-3, len(per_series))
        sid = per_series["score"].idxmax()
        centre = hits[hits["series_id"] == sid].sort_values(f"area_mm2_{subtype}").iloc[-1]
        ordered = index[index["series_id"] == sid].sort_values("slice_index")["image_id"].tolist()
        n = len(ordered)
        first = int(np.clip(centre["slice_index"] - columns // 2, 0, max(0, n - columns)))
        split = series.loc[sid, "split"]
        masks = np.load(data / TRUTH_DIR / f"{sid}.npz")
        mask_of = dict(zip(masks["image_ids"].tolist(), masks["masks"]))
        for col, k in enumerate(range(first, min(n, first + columns))):
            image_id = ordered[k]
            ax = axes[row, col]
            hu = read_hu(data / f"stage_2_{split}" / f"{image_id}.dcm")
            ax.imshow(np.clip((hu - lo) / (hi - lo), 0, 1), cmap="gray", vmin=0, vmax=1)
            lab = labels.loc[image_id]
            shown = [t for t in SUBTYPES if lab[t]]
            title = " ".join(SHORT[t] for t in shown) or "-"
            ax.set_title(f"{k}: {title}", fontsize=7, color=COLOURS[subtype] if lab[subtype] else "black")
            if outline and image_id in mask_of:
                bits = mask_of[image_id]
                for i, t in enumerate(SUBTYPES):
                    m = (bits >> i) & 1
                    if m.any():
                        ax.contour(m, [0.5], colors=COLOURS[t], linewidths=0.6)
        axes[row, 0].text(-0.05, 0.5, f"{subtype}\n{sid}", transform=axes[row, 0].transAxes, rotation=90,
                          ha="right", va="center", fontsize=7)
    fig.suptitle(f"{data.name}: one positive study per subtype, brain window {window[0]:g}/{window[1]:g}", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
