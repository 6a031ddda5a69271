"""Where did the model see blood? Grad-CAM, Guided Backpropagation, DeconvNet and Guided Grad-CAM.

The four methods come from captum (``LayerGradCam``, ``GuidedBackprop``, ``Deconvolution``,
``GuidedGradCam``); nothing here writes its own gradient hooks. Two things captum leaves to the
caller are done here, the same way for every zoo architecture:

* The Grad-CAM layer is found from the model: the outermost module whose output *is* the tensor
  ``forward_features`` returns (timm's last feature map before pooling: ``layer4`` of a ResNet,
  ``bn2`` of an EfficientNet, ``features`` of a VGG, ``stages`` of a ConvNeXt), or, for a model
  without ``forward_features``, the last module with a 4-D output.
* Guided Backpropagation and DeconvNet are defined on ReLUs, and captum hooks only ``nn.ReLU``
  modules; on an EfficientNet (SiLU), a ConvNeXt (GELU) or a MobileNetV3 (Hardswish) they would
  silently become the plain gradient. So the copy being explained has each such activation wrapped
  in an ``nn.ReLU`` subclass that computes the original function: captum then applies its rule
  (pass only positive gradients) at every rectifier-like activation, which is the usual
  generalisation of both methods to smooth rectifiers.

Explaining never touches the caller's model: it works on a deep copy in eval mode, so weights,
train/eval mode and ``requires_grad`` flags are as they were.
"""
from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam
from timm.layers import activations as timm_act

from competition.constants import LABELS
from features.dataset import unit_float
from features.windows import Combination, get_combination

METHODS: tuple[str, ...] = ("grad_cam", "guided_backprop", "deconvnet", "guided_grad_cam")
METHOD_TITLES = {
    "grad_cam": "Grad-CAM",
    "guided_backprop": "Guided Backprop",
    "deconvnet": "DeconvNet",
    "guided_grad_cam": "Guided Grad-CAM",
}

# Activations treated as rectifiers by Guided Backpropagation and DeconvNet (besides nn.ReLU).
RECTIFIER_LIKE: tuple[type[torch.nn.Module], ...] = (
    torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish,
    torch.nn.Mish, timm_act.Swish, timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU, timm_act.HardSwish,
    timm_act.Mish, timm_act.HardMish,
)


class RectifierView(torch.nn.ReLU):
    """Computes ``inner`` but is an ``nn.ReLU`` to captum, so its ReLU gradient rule applies here."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__(inplace=False)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def attribution_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy to explain: eval mode, no in-place activations, rectifier-like ones wrapped."""
    twin = copy.deepcopy(model).eval()
    for module in twin.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # backward hooks and in-place ops do not mix; the values are the same
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, RECTIFIER_LIKE) and not isinstance(child, torch.nn.ReLU):
                setattr(parent, child_name, RectifierView(child))
    for p in twin.parameters():
        p.requires_grad_(False)  # gradients are wanted for the input only
    return twin


def _is_map(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 4


def find_target_layer(model: torch.nn.Module, example: torch.Tensor) -> str:
    """Dotted name of the Grad-CAM layer: where the model's last spatial feature map comes out.

    ``example`` is one input batch (N x C x H x W); the model runs once, without gradients.
    """
    records: list[tuple[str, torch.Tensor]] = []  # (module name, output) in the order modules finish
    handles = []
    for name, module in model.named_modules():
        if name and not isinstance(module, torch.nn.Identity):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: records.append((name, out))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward_features = getattr(model, "forward_features", None)
            final = forward_features(example) if callable(forward_features) else None
            if final is None:
                model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if _is_map(final):
        # The outermost module returning the very tensor forward_features returns finishes last.
        same = [name for name, out in records if out is final]
        if same:
            return same[-1]
        shaped = [name for name, out in records if _is_map(out) and out.shape == final.shape]
        if shaped:
            return shaped[-1]
    maps = [name for name, out in records if _is_map(out)]
    if not maps:
        raise ValueError(f"{type(model).__name__} has no module with a 4-D (N x C x H x W) output; "
                         f"Grad-CAM needs a convolutional feature map (pass layer= to choose one)")
    return maps[-1]


def centre_channels(combination: Combination | str) -> list[int]:
    """Channels of the current slice (offset 0): what a panel shows of a 2.5D input."""
    comb = get_combination(combination) if isinstance(combination, str) else combination
    centre = [c for c, ch in enumerate(comb.channels) if ch.offset == 0]
    return centre or [len(comb.channels) // 2]


@dataclass
class Attributions:
    """The four maps of one image for one label; every array is (channels or 1) x H x W float32."""

    label: str
    probability: float  # sigmoid of the model's logit for ``label`` (one view, no TTA)
    layer: str  # the Grad-CAM layer
    maps: dict[str, np.ndarray] = field(default_factory=dict)


def attribute(
    model: torch.nn.Module,
    image: torch.Tensor,
    label: str = "any",
    layer: str | None = None,
    device: str | torch.device = "cpu",
) -> Attributions:
    """The four attributions of ``image`` (C x H x W) for output ``label``; ``model`` is not modified.

    Grad-CAM is ReLU'd (positive evidence only, as in the paper) and upsampled bilinearly to the
    input size; Guided Grad-CAM is Guided Backpropagation times that upsampled map (captum).
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; choose one of {', '.join(LABELS)}")
    if image.ndim != 3:
        raise ValueError(f"attribute() takes one C x H x W image, got shape {tuple(image.shape)}")
    target = LABELS.index(label)
    twin = attribution_copy(model).to(device)
    x = image.detach().float().unsqueeze(0).to(device)
    layer_name = layer or find_target_layer(twin, x)
    try:
        target_layer = twin.get_submodule(layer_name)
    except AttributeError:
        raise ValueError(f"layer {layer_name!r} is not a module of {type(model).__name__}") from None
    with torch.no_grad():
        probability = float(torch.sigmoid(twin(x)[0, target].double()))
    size = tuple(x.shape[-2:])
    with torch.enable_grad(), warnings.catch_warnings():
        # captum announces on every call that it sets (and later removes) hooks on ReLUs.
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU activations")
        cam = LayerGradCam(twin, target_layer).attribute(x, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")
        guided = GuidedBackprop(twin).attribute(x.clone().requires_grad_(True), target=target)
        deconv = Deconvolution(twin).attribute(x.clone().requires_grad_(True), target=target)
        guided_cam = GuidedGradCam(twin, target_layer).attribute(
            x.clone().requires_grad_(True), target=target, interpolate_mode="bilinear")
    maps = {name: t.detach()[0].float().cpu().numpy() for name, t in
            zip(METHODS, (cam, guided, deconv, guided_cam))}
    return Attributions(label=label, probability=probability, layer=layer_name, maps=maps)


def mass_fraction(heat: np.ndarray, region: np.ndarray) -> float:
    """Share of a non-negative map's total inside a boolean region (0 for an all-zero map)."""
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0, None)
    total = heat.sum()
    return float(heat[np.asarray(region, dtype=bool)].sum() / total) if total > 0 else 0.0


# --- panels -------------------------------------------------------------------------------------


def display_image(image: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """The windowed input as shown: H x W x 3 when the current slice has three windows (each a
    colour, as the 2019 kernels showed brain/subdural/bone), else the first one, H x W."""
    picked = np.clip(np.asarray(image, dtype=np.float32)[list(channels)], 0, 1)
    return np.moveaxis(picked, 0, -1) if len(picked) == 3 else picked[0]


def magnitude(attr: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """|attribution| summed over the shown channels, scaled to [0, 1] by its 99.5th percentile."""
    a = np.asarray(attr, dtype=np.float64)
    a = np.abs(a[list(channels)] if len(a) > 1 else a).sum(axis=0)
    top = np.percentile(a, 99.5)
    return np.clip(a / top, 0, 1) if top > 0 else np.zeros_like(a)


def panel_title(model_name: str, image_id: str, attrs: Attributions, truth: int | None, fold: int) -> str:
    known = "unknown" if truth is None else str(int(truth))
    return (f"{model_name} fold {fold} | {image_id} | {attrs.label}: p = {attrs.probability:.3f} "
            f"(one view), truth = {known} | Grad-CAM layer {attrs.layer}")


def render_panel(image: np.ndarray, attrs: Attributions, channels: Sequence[int], title: str, out_png: Path) -> Path:
    """One row: the windowed input, Grad-CAM over it, Guided Backprop, DeconvNet, Guided Grad-CAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from level1_models.atomic import atomic_path

    shown = display_image(image, channels)
    gray = {"cmap": "gray"} if shown.ndim == 2 else {}
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.9))
    axes[0].imshow(shown, vmin=0, vmax=1, **gray)
    axes[0].set_title("windowed input" + (" (centre slice)" if len(channels) < len(image) else ""))
    cam = attrs.maps["grad_cam"][0]
    axes[1].imshow(shown, vmin=0, vmax=1, **gray)
    top = float(cam.max()) if cam.max() > 0 else 1.0
    # Opacity follows the heat, so the slice stays readable where the model did not look.
    level = np.clip(cam / top, 0, 1)
    heat = plt.get_cmap("jet")(level)
    heat[..., 3] = 0.7 * np.sqrt(level)
    axes[1].imshow(heat)
    scale = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, top), cmap="jet")
    fig.colorbar(scale, ax=axes[1], fraction=0.046, pad=0.02)
    axes[1].set_title(METHOD_TITLES["grad_cam"])
    for ax, method, cmap in zip(axes[2:], METHODS[1:], ("gray", "gray", "hot")):
        ax.imshow(magnitude(attrs.maps[method], channels), cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"{METHOD_TITLES[method]} |attr|")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Title": title})  # the title, machine-readable
    plt.close(fig)
    return out_png


# --- a trained model folder ---------------------------------------------------------------------


def explain_dir(reports_dir: Path, model_name: str) -> Path:
    return Path(reports_dir) / "explain" / model_name


def _available_folds(model_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[4:]) for p in model_dir.glob("fold*/best.pt") if p.parent.name[4:].isdigit())


def _predictions(model_dir: Path, split: str) -> pd.DataFrame:
    """The model's OOF (train) or test predictions; per-fold files when the run is unfinished."""
    whole = model_dir / ("oof.parquet" if split == "train" else "test.parquet")
    if whole.is_file():
        return pd.read_parquet(whole)
    name = "oof.parquet" if split == "train" else "test.parquet"
    parts = [pd.read_parquet(model_dir / f"fold{k}" / name) for k in _available_folds(model_dir)
             if (model_dir / f"fold{k}" / name).is_file()]
    if not parts:
        raise FileNotFoundError(f"no {split} predictions in {model_dir}; finish a fold with `make oof` or pass IMAGE=")
    if split == "test":  # each fold predicts every test image: average them, as the run does
        return pd.concat(parts).groupby("image_id", as_index=False)[list(LABELS)].mean()
    return pd.concat(parts, ignore_index=True)


def top_images(model_dir: Path, n: int, label: str = "any", split: str = "train") -> list[str]:
    """The ``n`` images with the highest predicted ``label`` (OOF for train, fold mean for test)."""
    if n < 1:
        raise ValueError(f"TOP must be at least 1, got {n}")
    preds = _predictions(model_dir, split)
    return preds.sort_values([label, "image_id"], ascending=[False, True], kind="mergesort")["image_id"].head(n).tolist()


def _truth_table(paths, data_dir: Path | str | None) -> pd.DataFrame | None:
    """Known labels: the train labels, plus a synthetic dataset's test answers."""
    from competition.labels import read_labels
    from competition.layout import Layout, LayoutError

    tables = [pd.read_parquet(paths.labels)] if paths.labels.is_file() else []
    try:
        answers = Layout.find(data_dir).answers if data_dir is not None else None
    except LayoutError:
        answers = None
    if answers is not None:
        tables.append(read_labels(answers))
    return pd.concat(tables, ignore_index=True).drop_duplicates("image_id").set_index("image_id") if tables else None


def explain_images(
    model_name: str,
    data_dir: Path | str,
    work_dir: Path | str | None = None,
    image_ids: Sequence[str] | None = None,
    top: int | None = None,
    label: str = "any",
    fold: int | None = None,
    split: str = "train",
    layer: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> list[Path]:
    """``make explain``: one panel per image under ``WorkPaths.reports/explain/<model>/``.

    A train image is explained by the fold model that did not train on it (its OOF fold) unless
    ``fold`` is given; a test image by fold 0 (or ``fold``). ``top`` ranks by the predicted
    ``label`` (OOF predictions for ``split`` train, the fold mean for test).
    """
    from competition.progress import progress_bar

    from competition.paths import WorkPaths
    from level1_models.data import CacheDatasets
    from level1_models.predict import load_fold_model

    if label not in LABELS:
        raise ValueError(f"unknown LABEL {label!r}; choose one of {', '.join(LABELS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if (image_ids is None) == (top is None):
        raise ValueError("give exactly one of IMAGE=<image_id>[,...] or TOP=<n>")
    paths = WorkPaths.for_data(data_dir, work_dir)
    model_dir = paths.model_dir(model_name)
    folds_here = _available_folds(model_dir)
    if not folds_here:
        raise FileNotFoundError(f"no trained fold of {model_name} in {model_dir} (fold<k>/best.pt); "
                                f"train it with `make oof MODEL={model_name}`")
    if fold is not None and fold not in folds_here:
        raise ValueError(f"fold {fold} of {model_name} is not trained (trained: {folds_here})")
    if not paths.metadata.is_file():
        raise FileNotFoundError(f"metadata table {paths.metadata} not found; run `make prepare DATA={data_dir}` first")
    metadata = pd.read_parquet(paths.metadata)
    ids = list(image_ids) if image_ids is not None else top_images(model_dir, int(top), label, split)
    unknown = [i for i in ids if i not in set(metadata["image_id"])]
    if unknown:
        raise ValueError(f"image {unknown[0]} is not in {paths.metadata}; image ids look like ID_0a1b2c3d4")
    truth = _truth_table(paths, data_dir)
    own_fold = (pd.read_parquet(paths.folds).set_index("image_id")["fold"].astype(int)
                if paths.folds.is_file() else pd.Series(dtype=int))

    def fold_for(image_id: str) -> int:
        if fold is not None:
            return fold
        k = own_fold.get(image_id)
        return int(k) if k is not None and int(k) in folds_here else folds_here[0]

    out_dir = explain_dir(paths.reports, model_name)
    written: list[Path] = []
    loaded: dict[int, tuple[torch.nn.Module, object]] = {}
    datasets = None
    for image_id in progress_bar(ids, desc=f"explain {model_name}", unit="slice", disable=not progress, file=sys.stderr):
        k = fold_for(image_id)
        if k not in loaded:
            loaded[k] = load_fold_model(model_name, k, model_dir=model_dir, device=device)
        model, cfg = loaded[k]
        if datasets is None:
            labels = pd.DataFrame(columns=["image_id", *LABELS])
            # uint8 as in training and OOF prediction, so the explained probability is the OOF one.
            datasets = CacheDatasets(metadata, labels, paths.cache, cfg.combination, cfg.img_size, as_uint8=True,
                                     augment_config=cfg.aug)
        image = unit_float(datasets([image_id], labeled=False, augment=False)[0][0])
        attrs = attribute(model, image, label, layer=layer, device=device)
        known = None
        if truth is not None and image_id in truth.index:
            known = int(truth.at[image_id, label])
        channels = centre_channels(cfg.combination)
        title = panel_title(model_name, image_id, attrs, known, k)
        written.append(render_panel(image.numpy(), attrs, channels, title, out_dir / f"{image_id}_{label}.png"))
    return written
