"""Building a spec's network with timm, and finding ImageNet weights without any network access.

timm would download missing weights; here nothing may touch the network. So the weights file is
located first (a given local file, else timm's Hugging Face cache, else torch hub's checkpoint
folder) and handed to timm as ``pretrained_cfg_overlay={"file": ...}``, which makes timm load that
file (adapting the first convolution to the channel count and dropping the ImageNet classifier).
When no file is found the model trains from scratch, said in one line, or it is an error with
``require_pretrained``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from competition.constants import LABELS
from features.windows import n_channels
from level1_models.config import TrainConfig

NUM_OUTPUTS = len(LABELS)


class PretrainedWeightsMissing(FileNotFoundError):
    """No local ImageNet weights for an architecture while ``require_pretrained`` is set."""


def cached_weights(arch: str, hf_cache_dir: Path | str | None = None) -> Path | None:
    """The locally cached ImageNet weights timm would use for ``arch``, or None. Never downloads.

    ``hf_cache_dir`` defaults to the Hugging Face hub cache (HF_HUB_CACHE / HF_HOME)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = ["model.safetensors", cfg.hf_hub_filename or "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo_id=repo, filename=filename, revision=revision or None,
                                           cache_dir=str(hf_cache_dir) if hf_cache_dir else None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if candidate.is_file():
            return candidate
    return None


def find_weights(cfg: TrainConfig) -> Path | None:
    """The weights file this run will load, or None (from scratch). Raises when required and absent."""
    if not cfg.pretrained:
        return None
    if cfg.pretrained_file:
        path = Path(cfg.pretrained_file)
        if not path.is_file():
            raise PretrainedWeightsMissing(f"pretrained_file {path} does not exist; fix the path or drop --set pretrained_file")
        return path
    path = cached_weights(cfg.arch)
    if path is None and cfg.require_pretrained:
        raise PretrainedWeightsMissing(
            f"no ImageNet weights for {cfg.arch} in timm's cache ({_hf_cache_dir()}) or "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}; copy them there, pass --set pretrained_file=PATH, "
            f"or drop --set require_pretrained=true to train from scratch"
        )
    return path


def _hf_cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def create_network(cfg: TrainConfig, weights: Path | None = None) -> torch.nn.Module:
    """The timm network for ``cfg``: six logits, one input channel per window of its combination."""
    kwargs = dict(
        num_classes=NUM_OUTPUTS,
        in_chans=n_channels(cfg.combination),
        drop_rate=cfg.drop_rate,
    )
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.output_stride != 32:
        kwargs["output_stride"] = cfg.output_stride
    if weights is None:
        return timm.create_model(cfg.arch, pretrained=False, **kwargs)
    # Belt and braces: even if timm ignored the file, it must not reach for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return timm.create_model(cfg.arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)


def build_model(cfg: TrainConfig, use_pretrained: bool = True, announce: bool = True) -> torch.nn.Module:
    """The network, with ImageNet weights when found; one line says which."""
    weights = find_weights(cfg) if use_pretrained else None
    if announce and use_pretrained:
        if weights is not None:
            print(f"{cfg.name}: starting from ImageNet weights {weights}", file=sys.stderr, flush=True)
        elif cfg.pretrained:
            print(
                f"{cfg.name}: no local ImageNet weights for {cfg.arch}; training from scratch "
                f"(--set require_pretrained=true makes this an error)",
                file=sys.stderr, flush=True,
            )
        else:
            print(f"{cfg.name}: pretrained=false; training from scratch", file=sys.stderr, flush=True)
    return create_network(cfg, weights)
