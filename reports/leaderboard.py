"""CV against leaderboard: each scored submission's OOF weighted log loss against its public and private
score, with Pearson's correlation, as ``cv_vs_lb.png`` beside the submissions log.

``python -m reports.leaderboard --log LOG`` (run by `make leaderboard`); the HTML report embeds the
figure and the table when the log of the default submissions folder has them (``leaderboard_section``).
"""
from __future__ import annotations

import argparse
import base64
import html
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from competition.cli import run_main
from submissions.log import read_log

PLOT_NAME = "cv_vs_lb.png"
BOARDS = {"public_score": "public", "private_score": "private"}


def scored_points(log: pd.DataFrame) -> pd.DataFrame:
    """Rows with an OOF score and both leaderboard scores, as floats."""
    cols = ["oof_weighted_log_loss", *BOARDS]
    points = log.assign(**{c: pd.to_numeric(log[c], errors="coerce") for c in cols})
    return points.dropna(subset=cols)


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN for under three points or a constant column (undefined, not 0)."""
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def plot_cv_vs_lb(log: pd.DataFrame, out: Path) -> dict[str, float]:
    """Draw the figure into ``out``; returns r per board (NaN where undefined)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = scored_points(log)
    x = points["oof_weighted_log_loss"].to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    found = {}
    for ax, (col, board) in zip(axes, BOARDS.items()):
        y = points[col].to_numpy()
        found[board] = r = correlation(x, y)
        ax.scatter(x, y, color="tab:blue" if board == "public" else "tab:red")
        # The message tells submissions apart (most are "stack"); cut so that labels stay readable.
        labels = [m if len(m) <= 24 else m[:23] + "…" for m in points["message"].fillna("").astype(str)]
        for xi, yi, name in zip(x, y, labels):
            ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if len(x):
            lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="LB = CV")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"{board} leaderboard: r = {'n/a' if np.isnan(r) else f'{r:.3f}'} ({len(x)} submissions)")
        ax.set_xlabel("OOF weighted log loss (CV)")
        ax.set_ylabel(f"{board} score")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return found


def leaderboard_section(log_path: Path) -> str:
    """The report's HTML section (figure and log table), or "" when there is no log."""
    if not log_path.is_file():
        return ""
    log = read_log(log_path)
    cols = ["time", "source", "oof_weighted_log_loss", "public_score", "private_score", "message"]
    table = log[cols].rename(columns={"oof_weighted_log_loss": "OOF"}).to_html(index=False, escape=True, border=0)
    plot = log_path.parent / PLOT_NAME
    data = base64.b64encode(plot.read_bytes()).decode("ascii") if plot.is_file() else ""
    img = (f'<img alt="CV against the leaderboard" src="data:image/png;base64,{data}" style="max-width:100%" />'
           if plot.is_file() else "<p>no figure yet: run <code>make leaderboard</code></p>")
    return (f'<section id="leaderboard"><h2>CV against the leaderboard</h2>'
            f"<p>submissions log <code>{html.escape(str(log_path))}</code></p>{img}{table}</section>")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reports.leaderboard", description=__doc__)
    ap.add_argument("--log", required=True, type=Path, help="the submissions log (submissions/log.csv)")
    args = ap.parse_args(argv)
    if not args.log.is_file():
        raise FileNotFoundError(f"no submissions log at {args.log}; `make submit FILE=...` writes it")
    out = args.log.parent / PLOT_NAME
    found = plot_cv_vs_lb(read_log(args.log), out)
    shown = {board: "n/a (under 3 scored submissions)" if np.isnan(r) else f"{r:.3f}" for board, r in found.items()}
    print(f"{out}: CV against LB, r public {shown['public']}, r private {shown['private']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m reports.leaderboard"))
