"""Training curves: one CSV per fold (written every epoch) and one PNG for the model."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from level1_models.atomic import atomic_path, write_csv

COLUMNS = ["epoch", "lr", "train_loss", "val_weighted_log_loss", "train_images_per_s", "epoch_seconds", "best"]


def write_curve(path: Path, history: Sequence[Mapping]) -> None:
    write_csv(path, pd.DataFrame(list(history), columns=COLUMNS))


def plot_curves(curves: Mapping[int, pd.DataFrame], out_png: Path, title: str) -> None:
    """Train loss and validation weighted log loss per epoch, one colour per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for k, (fold, frame) in enumerate(sorted(curves.items())):
        colour = f"C{k % 10}"
        axes[0].plot(frame["epoch"], frame["train_loss"], color=colour, marker="o", label=f"fold {fold}")
        axes[1].plot(frame["epoch"], frame["val_weighted_log_loss"], color=colour, marker="o", label=f"fold {fold}")
        best = frame[frame["best"].astype(bool)]
        if len(best):
            last_best = best.iloc[-1]
            axes[1].scatter([last_best["epoch"]], [last_best["val_weighted_log_loss"]], color=colour, s=90,
                            facecolors="none")
    axes[0].set_title("train loss (weighted BCE)")
    axes[1].set_title("validation weighted log loss (o = best)")
    axes[1].set_yscale("log")  # early BatchNorm epochs can spike far above the rest
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
