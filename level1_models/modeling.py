"""Building a spec's network with timm: six logits, one input channel per window, ImageNet weights
(found or downloaded by pretrained.py) and the backbone's own input normalisation.

The data pipeline yields windowed channels in [0, 1]; a pretrained backbone expects its training
statistics (ImageNet's mean/std, or Inception-style [-1, 1]). The mapping is the first thing the
network does, inside the model (a pre-hook on its first convolution), so every consumer gets it
for free: training, prediction, the embeddings (``forward_features``), Grad-CAM, ``torch.compile``.
It runs before that convolution pads its input, as in the pretrained model. The statistics are
buffers of that convolution and travel in the checkpoint; a checkpoint from before they existed
loads with the identity (mean 0, std 1), which is what it was trained with.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from competition.constants import LABELS
from features.windows import n_channels
from level1_models.config import TrainConfig
from level1_models.pretrained import (  # noqa: F401  (re-exported: the weights API lives there)
    PretrainedWeightsMissing,
    WeightsChoice,
    cached_weights,
    choose_weights,
    find_weights,
)

NUM_OUTPUTS = len(LABELS)
NORM_BUFFERS = ("input_mean", "input_std")


def input_stats(pretrained_cfg: Mapping[str, Any], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) for ``channels`` inputs from the backbone's pretrained config."""
    mean = [float(v) for v in pretrained_cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)]
    std = [float(v) for v in pretrained_cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)]
    if len(mean) != channels or len(std) != channels:
        # Our channels are CT windows, not R, G, B. With another channel count timm adapts the
        # pretrained first convolution by summing (1 channel) or cycling and rescaling (> 3) the
        # RGB filters, so every input channel stands for a mix of the colours: the average of the
        # colours' statistics is the one that fits each channel alike.
        mean = [sum(mean) / len(mean)] * channels
        std = [sum(std) / len(std)] * channels
    return mean, std


def _normalise_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x, *rest = args
    return ((x - module.input_mean) / module.input_std, *rest)


def _identity_for_old_checkpoints(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    if prefix + NORM_BUFFERS[0] not in state_dict and prefix + "weight" in state_dict:
        state_dict[prefix + "input_mean"] = torch.zeros_like(module.input_mean)
        state_dict[prefix + "input_std"] = torch.ones_like(module.input_std)


def first_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module that sees the input first: timm's ``first_conv``, else the first Conv2d."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(name, str):
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module
    raise ValueError(f"{type(model).__name__} has no Conv2d to normalise the input at")


def add_input_normalisation(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """Make ``model``'s first layer map its [0, 1] input to ``(x - mean) / std`` per channel."""
    layer = first_layer(model)
    shape = (1, len(mean), 1, 1)
    layer.register_buffer(NORM_BUFFERS[0], torch.tensor(mean, dtype=torch.float32).view(shape))
    layer.register_buffer(NORM_BUFFERS[1], torch.tensor(std, dtype=torch.float32).view(shape))
    layer.register_forward_pre_hook(_normalise_input)
    layer.register_load_state_dict_pre_hook(_identity_for_old_checkpoints)


def create_network(cfg: TrainConfig, weights: Path | None = None) -> torch.nn.Module:
    """The timm network for ``cfg``: six logits, one input channel per window of its combination,
    ImageNet weights from ``weights`` when given, inputs normalised as the backbone expects."""
    channels = n_channels(cfg.combination)
    kwargs: dict[str, Any] = dict(num_classes=NUM_OUTPUTS, in_chans=channels, drop_rate=cfg.drop_rate)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.output_stride != 32:
        kwargs["output_stride"] = cfg.output_stride
    if weights is None:
        model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
    else:
        model = timm.create_model(cfg.arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    # The same statistics with or without weights (tiny test archs included), so a model built for
    # prediction normalises as the one that was trained.
    add_input_normalisation(model, *input_stats(model.pretrained_cfg, channels))
    return model


def build_model(cfg: TrainConfig, use_pretrained: bool = True, announce: bool = True) -> torch.nn.Module:
    """The network, with ImageNet weights when wanted (found or downloaded); one line says which."""
    choice = choose_weights(cfg) if use_pretrained else WeightsChoice(None, "")
    if announce and choice.note:
        print(choice.note, file=sys.stderr, flush=True)
    return create_network(cfg, choice.path)
