"""Fold checkpoints: saved atomically, loaded with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors and JSON-like values (no pickled objects), so
``torch.load(weights_only=True)`` reads it. It names its architecture and input channels; loading
one into a different model fails with a message that says what is in the file and what was asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from level1_models.atomic import atomic_path
from level1_models.config import TrainConfig

FORMAT = "rsna-level1-checkpoint-v1"


class CheckpointMismatchError(ValueError):
    """A checkpoint of another architecture / input than the model it is loaded into."""


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def make_state(cfg: TrainConfig, model: torch.nn.Module, fold: int, epoch: int, **extra: Any) -> dict[str, Any]:
    """The common part of every checkpoint: what the weights are, and the weights."""
    return {
        "model_name": cfg.name,
        "arch": cfg.arch,
        "combination": cfg.combination,
        "img_size": cfg.img_size,
        "output_stride": cfg.output_stride,
        "config": cfg.to_dict(),
        "fold": fold,
        "epoch": epoch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train the fold first (make oof MODEL=...)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not a level-1 checkpoint of this project (format {FORMAT})")
    return state


def check_compatible(state: dict[str, Any], cfg: TrainConfig, path: Path | str) -> None:
    """Raise unless the checkpoint holds the architecture and input that ``cfg`` builds."""
    wanted = {"arch": cfg.arch, "combination": cfg.combination, "output_stride": cfg.output_stride}
    found = {k: state.get(k) for k in wanted}
    if found != wanted:
        diff = ", ".join(f"{k}={found[k]!r} (wanted {wanted[k]!r})" for k in wanted if found[k] != wanted[k])
        raise CheckpointMismatchError(
            f"{path} holds a {state.get('arch')!r} checkpoint of model {state.get('model_name')!r}, "
            f"not one for {cfg.name!r}: {diff}"
        )


def load_weights(model: torch.nn.Module, state: dict[str, Any], cfg: TrainConfig, path: Path | str) -> None:
    """Load a checkpoint's weights into ``model`` after checking it is the same architecture."""
    check_compatible(state, cfg, path)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointMismatchError(
            f"{path}: weights do not fit {cfg.arch} ({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None
