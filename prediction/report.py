"""report.html of one prediction: self-contained (images inlined), readable without the tables.

Per series: the six probabilities along z, and its most suspicious slices with Grad-CAM and
Guided Grad-CAM (``level1_models.explain.attribute``, label ``any``) put back on the slice's own
pixel grid (``features.crop.to_original``). Per study: the decision at the OOF threshold. Also the
models used, what was skipped, and that this is a research tool, not a medical device.
"""
from __future__ import annotations

import base64
import html
import io
import textwrap
import warnings

import numpy as np
import pandas as pd

from competition.atomic import atomic_path
from competition.constants import LABELS
from features.crop import to_original
from features.dataset import unit_float
from features.windows import PRESETS, window_linear
from level1_models.explain import attribute, magnitude

DISCLAIMER = ("Research tool, not a medical device: these probabilities come from models trained for a Kaggle "
              "competition and are not validated for clinical use. Do not base a diagnosis or treatment on them.")
COLOURS = dict(zip(LABELS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#000000")))


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_plot(series: pd.DataFrame, threshold: float | None) -> str:
    """The six probabilities along the series (x: z in mm where known, else the slice index)."""
    plt = _pyplot()
    use_z = series["z"].notna().all()
    x = series["z"] if use_z else series["slice_index"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for label in LABELS:
        ax.plot(x, series[label], marker=".", lw=2.2 if label == "any" else 1.2, color=COLOURS[label], label=label)
    if threshold is not None:
        ax.axhline(threshold, ls="--", color="grey", lw=1, label="study threshold (any)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("z (mm)" if use_z else "slice index (z order)")
    ax.set_ylabel("probability")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    return _png(fig)


TITLE_CHARS = 100  # characters a line of the panel's title holds (10.5 in at 9 pt)


def shorten_middle(text: str, width: int = TITLE_CHARS) -> str:
    """``text`` cut to ``width`` characters in the middle, keeping both ends (a UID's root and its
    distinguishing tail)."""
    if len(text) <= width:
        return text
    head = (width - 3 + 1) // 2
    return f"{text[:head]}...{text[len(text) - (width - 3 - head):]}"


def panel_title(image_id: str, caption: str, width: int = TITLE_CHARS) -> str:
    """The slice's id on its own line (a 64-character UID fits whole; longer ones lose their middle),
    then the caption wrapped to the figure's width."""
    return "\n".join([shorten_middle(image_id, width), *textwrap.wrap(caption, width)])


def slice_panel(hu: np.ndarray, cam: np.ndarray, guided: np.ndarray, title: str) -> str:
    """The slice (brain window), Grad-CAM over it, Guided Grad-CAM |attribution| over it."""
    return _png(panel_figure(hu, cam, guided, title))


def panel_figure(hu: np.ndarray, cam: np.ndarray, guided: np.ndarray, title: str):
    """:func:`slice_panel`'s figure; its height grows with the title's lines so none is cut."""
    plt = _pyplot()
    brain = window_linear(hu, PRESETS["brain"].center, PRESETS["brain"].width)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    for ax, overlay, name in zip(axes, (None, cam, guided), ("slice (brain window)", "Grad-CAM", "Guided Grad-CAM")):
        ax.imshow(brain, cmap="gray", vmin=0, vmax=1)
        if overlay is not None:
            top = float(overlay.max()) or 1.0
            level = np.clip(overlay / top, 0, 1)
            heat = plt.get_cmap("jet" if name == "Grad-CAM" else "hot")(level)
            heat[..., 3] = 0.75 * np.sqrt(level)  # opacity follows the heat: the slice stays readable
            ax.imshow(heat)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    lines = title.count("\n") + 1
    fig.set_size_inches(10.5, 3.8 + 0.16 * lines)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.16 * lines / (3.8 + 0.16 * lines) - 0.01))
    return fig


def top_slices(series: pd.DataFrame, top: int) -> list[str]:
    """The image ids of the ``top`` slices with the highest ``any`` probability (ties in z order)."""
    return series.sort_values("any", ascending=False, kind="mergesort")["image_id"].head(top).tolist()


def explanations(result, predictor, ids: list[str]):
    """(image_id, hu, Grad-CAM, Guided Grad-CAM |attribution|, title) for ``ids``, each map on the
    slice's own pixel grid, explained by the first fold model of the member with the best OOF score."""
    name = predictor.ensemble.best_member().name
    model, cfg, fold = predictor.fold_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = predictor.dataset(result.study, name, result.caches)
    position = {image_id: i for i, image_id in enumerate(ds.image_ids)}
    centre = [c for c, ch in enumerate(ds.combination.channels) if ch.offset == 0] or [0]
    for image_id in ids:
        i = position[image_id]
        attrs = attribute(model, unit_float(ds[i][0]), "any", device=predictor.device)
        hu = result.study.hu[image_id]
        box = ds.box(i)
        cam = to_original(attrs.maps["grad_cam"][0], box, hu.shape)
        guided = to_original(magnitude(attrs.maps["guided_grad_cam"], centre), box, hu.shape)
        ensemble_any = float(result.slices.set_index("image_id").at[image_id, "any"])
        caption = (f"any = {ensemble_any:.3f} (ensemble); explained by {name} fold {fold} "
                   f"(p = {attrs.probability:.3f}, one view), Grad-CAM layer {attrs.layer}")
        if not cam.max() > 0:
            caption += ". Grad-CAM is zero here: the model found no positive evidence for 'any' in its last feature map"
        yield image_id, hu, cam, guided, panel_title(image_id, caption)


def explain_slices(result, predictor, ids: list[str]) -> list[tuple[str, str]]:
    """(image_id, panel) for ``ids`` (see ``explanations``)."""
    return [(image_id, slice_panel(hu, cam, guided, title))
            for image_id, hu, cam, guided, title in explanations(result, predictor, ids)]


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0, classes="t", na_rep="")


def write_report(path, result, studies: pd.DataFrame, predictor, top: int = 3) -> None:
    ensemble = predictor.ensemble
    t = ensemble.threshold.get("threshold")
    parts = [f"<h1>Head CT hemorrhage prediction: {html.escape(str(result.study.root.name))}</h1>",
             f"<p class='warn'>{html.escape(DISCLAIMER)}</p>", "<h2>Studies</h2>"]
    shown = studies[["study_id", "n_slices", *LABELS, "decision"]]
    parts.append(_table(shown))
    if t is None:
        parts.append("<p>No study-level threshold: the models' work folder had no OOF predictions.</p>")
    else:
        th = ensemble.threshold
        parts.append(f"<p>Decision: <b>bleed</b> when the study's <i>any</i> probability (the maximum over its slices) "
                     f"is at least {t:.3f}. On the out-of-fold predictions ({html.escape(th.get('predictions', ''))}; "
                     f"{int(th.get('n_studies', 0))} studies, {int(th.get('n_positive', 0))} with a bleed) this threshold "
                     f"gave sensitivity {_figure(th.get('sensitivity'))} and specificity {_figure(th.get('specificity'))} "
                     f"(chosen as the highest threshold reaching sensitivity {th.get('target_sensitivity', 0):.2f}).</p>")
    parts.append(f"<p>Slice probabilities: {html.escape(result.level)}.</p>")
    for series_id, series in result.slices.groupby("series_id", sort=False):
        parts.append(f"<h2>Series {html.escape(str(series_id))} (study {html.escape(str(series['study_id'].iloc[0]))}, "
                     f"{len(series)} slices)</h2><img src='{series_plot(series, t)}'>")
        ids = top_slices(series, top)
        if ids:
            what = "The slice" if len(ids) == 1 else f"The {len(ids)} slices"
            parts.append(f"<h3>{what} with the highest <i>any</i> probability</h3>")
            parts += [f"<div><img src='{panel}'></div>" for _, panel in explain_slices(result, predictor, ids)]
    members = pd.DataFrame([{"model": m.name, "folds": ",".join(map(str, m.folds)), "windows": m.combination,
                             "input px": m.img_size, "cache px": m.cache_size,
                             "OOF weighted log loss": m.oof_weighted_log_loss} for m in ensemble.members])
    combined = (f"go to {result.level}" if predictor.stack is not None
                else f"are averaged (level 2 not applied: {ensemble.not_stacked})")
    parts += ["<h2>Models</h2>", _table(members), f"<p>From {html.escape(ensemble.source)}; device "
              f"{html.escape(str(predictor.device))}; hflip test-time augmentation; the fold models' "
              f"probabilities {html.escape(combined)}.</p>"]
    warned = getattr(result.study, "warnings", None)
    if warned is not None and len(warned):
        parts += [f"<h2>Warnings ({len(warned)})</h2><p>These files were predicted, with the caveat given.</p>",
                  _table(warned)]
    if len(result.study.skipped):
        parts += [f"<h2>Skipped files ({len(result.study.skipped)})</h2>", _table(result.study.skipped)]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}"
             ".warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em}"
             "table.t{border-collapse:collapse;font-size:13px}table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd}"
             "img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Prediction: {html.escape(result.study.root.name)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
