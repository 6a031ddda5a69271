"""Fold checkpoints: saved atomically, loaded with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors and JSON-like values (no pickled objects), so
``torch.load(weights_only=True)`` reads it. It names its architecture and input channels; loading
one into a different model fails with a message that says what is in the file and what was asked.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from level1_models.atomic import atomic_path
from level1_models.config import TrainConfig

FORMAT = "rsna-level1-checkpoint-v1"


class CheckpointMismatchError(ValueError):
    """A checkpoint of another architecture / input than the model it is loaded into."""


class CheckpointCorruptError(ValueError):
    """A file that torch cannot read back (truncated by a kill or a full disk, or not a checkpoint)."""


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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        # (An OSError is the disk's or the permissions' problem, not the file's: it passes through.)
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointCorruptError(f"{path} cannot be read ({reason}); delete it (and retrain what it held) "
                                     f"or restore it from a copy") from None
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


def save_rotating(path: Path | str, previous: Path | str, state: dict[str, Any]) -> None:
    """Save ``state`` to ``path`` and keep the checkpoint it replaces as ``previous``: if the new one
    is ever unreadable (a kill or a full disk mid-write on a file system without atomic rename),
    the one before is still there."""
    path = Path(path)
    if path.is_file():
        os.replace(path, previous)
    save_checkpoint(path, state)


def load_resume_state(path: Path | str, previous: Path | str) -> tuple[dict[str, Any] | None, str | None]:
    """The newest readable resume state of ``path`` and ``previous`` (None: start over), and a line
    saying what was skipped, if anything."""
    notes = []
    for candidate in (Path(path), Path(previous)):
        if not candidate.is_file():
            continue
        try:
            state = load_checkpoint(candidate)
        except CheckpointCorruptError as err:
            notes.append(str(err).split(";")[0])
            continue
        if notes:
            notes.append(f"resuming from {candidate.name} instead")
        return state, "; ".join(notes) or None
    if notes:
        notes.append("no readable resume state is left: the fold starts over")
    return None, "; ".join(notes) or None
