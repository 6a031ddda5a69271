"""A fold's resume state besides its weights: where training stands, how this run cuts it into
optimiser steps (``Layout``), when a mid-epoch checkpoint is due, and how a resume on another GPU
count, batch or accumulation continues (``recut_resume``): at the same share of training by images
seen, or refused where that share would mean nothing (another schedule, other training images).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from level1_models.checkpoint import make_state, save_rotating
from level1_models.config import ConfigError, TrainConfig
from level1_models.distributed import DistEnv, all_reduce_sum
from level1_models.loop import EpochProgress, Trainer, epoch_batches

# What a fold's schedule is made of besides the global batch: a resume on another global batch
# continues at the same share of training only when none of these changed.
SCHEDULE_FIELDS = ("epochs", "epoch_fraction", "scheduler", "warmup_epochs", "min_lr_ratio", "restart_epochs",
                   "lr_milestones", "lr_gamma", "lr", "lr_batch", "lr_scale", "optimizer")


@dataclass(frozen=True)
class Layout:
    """How a fold's training is cut into optimiser steps on this run (saved in ``last.pt``)."""

    world_size: int
    batch_size: int  # per process
    accumulate: int
    global_batch: int
    steps_per_epoch: int
    images_per_epoch: int  # the images of an epoch's steps (whole steps of the seeded permutation)
    n_train: int  # the fold's training images

    @classmethod
    def of(cls, cfg: TrainConfig, world_size: int, n_train: int) -> "Layout":
        steps = epoch_batches(n_train, cfg.global_batch(world_size), 0, cfg.epoch_fraction)
        return cls(world_size, cfg.batch_size, cfg.accumulate, cfg.global_batch(world_size), len(steps),
                   sum(len(b) for b in steps), n_train)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Layout":
        return cls(*(int(values[f.name]) for f in fields(cls)))

    def describe(self, short: bool = False) -> str:
        """``2 processes x batch 4 x accumulate 2`` (short: ``2 x 4 x accumulate 2``)."""
        processes = "" if short else f" process{'es' if self.world_size > 1 else ''}"
        text = f"{self.world_size}{processes} x {'' if short else 'batch '}{self.batch_size}"
        return text + (f" x accumulate {self.accumulate}" if self.accumulate > 1 else "")


@dataclass
class FoldState:
    """The resume state of a fold besides the weights: where training stands and its curve."""

    epoch: int = 0  # epochs finished
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    progress: EpochProgress = field(default_factory=EpochProgress)  # within epoch ``epoch + 1``
    samples: int = 0  # images trained on in the finished epochs (unknown, 0, from a last.pt before layouts)

    def to_dict(self) -> dict[str, Any]:
        p = self.progress
        return {"epoch": self.epoch, "best_loss": float(self.best_loss), "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "history": self.history,
                "epoch_progress": {"step": p.step, "loss_sum": p.loss_sum, "images": p.images, "seconds": p.seconds,
                                   "samples": p.samples}}

    def layout_record(self, layout: Layout, optimizer_steps: int) -> dict[str, Any]:
        """The ``layout`` entry of ``last.pt``: how this run cut training, and how far it got."""
        return {**asdict(layout), "optimizer_steps": optimizer_steps,
                "samples_seen": self.samples + self.progress.samples, "samples_seen_in_epoch": self.progress.samples}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> "FoldState":
        p = state.get("epoch_progress") or {}
        layout = state.get("layout") or {}
        in_epoch = int(p.get("samples", 0))
        return cls(int(state["epoch"]), float(state["best_loss"]), int(state["best_epoch"]), int(state["bad_epochs"]),
                   list(state["history"]), EpochProgress(int(p.get("step", 0)), float(p.get("loss_sum", 0.0)),
                                                         int(p.get("images", 0)), float(p.get("seconds", 0.0)),
                                                         in_epoch),
                   int(layout.get("samples_seen", in_epoch)) - in_epoch)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch random state (dropout masks) to restore in a resumed epoch."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any] | None, device: torch.device) -> None:
    if state:
        torch.set_rng_state(state["cpu"])
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointClock:
    """Says when a mid-epoch checkpoint is due; under DDP every process agrees (rank 0's clock)."""

    def __init__(self, minutes: float, env: DistEnv, device: torch.device, check_every: int = 20):
        self.seconds, self.env, self.device, self.every = minutes * 60.0, env, device, check_every
        self.last, self.steps = time.monotonic(), 0

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.seconds <= 0:
            return False
        self.steps += 1
        if self.env.enabled and self.steps % self.every:
            return False  # under DDP the clocks are compared only every few steps (one all-reduce)
        late = float(time.monotonic() - self.last >= self.seconds) if self.env.is_main else 0.0
        return all_reduce_sum([late], self.env, self.device)[0] > 0


def recut_resume(cfg: TrainConfig, layout: Layout, resume: dict[str, Any], st: FoldState, fold: int,
                 last: Path) -> tuple[int, str] | None:
    """Where a resumed fold continues when ``last.pt`` was written on another layout (GPU count,
    batch, accumulation), and the line that says so: the optimiser step of this run's schedule at
    the same share of training by samples seen. ``st`` is moved there: this epoch's seeded
    permutation cut into this run's batches, from the first whole batch not yet seen (these are
    the batches a fresh epoch of this layout has, so that is where its micro-batch index starts).
    None: the same layout (or a ``last.pt`` from before layouts were saved), resumed as saved.
    Raises ConfigError where the share of training would mean nothing: another schedule, or other
    training images."""
    if resume.get("layout") is None:
        return None
    old = Layout.from_dict(resume["layout"])
    fix = f"delete {last} to restart fold {fold}, or rerun with the old setting"
    if old.n_train != layout.n_train:
        raise ConfigError(f"fold {fold}: {last} was trained on {old.n_train} images, this run has {layout.n_train} "
                          f"(limit or the cache changed?); {fix}")
    saved, now = resume.get("config") or {}, cfg.to_dict()
    changed = [k for k in SCHEDULE_FIELDS if k in saved and saved[k] != now[k]]
    if changed:
        text = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"fold {fold}: {last} was trained on another schedule ({text}), so how far it got does "
                          f"not carry over; {fix}")
    if old == layout:
        return None
    in_epoch = int(resume["layout"]["samples_seen_in_epoch"])
    steps_done = min(in_epoch // layout.global_batch, layout.steps_per_epoch)
    p = st.progress
    scale = old.world_size / layout.world_size  # rank 0's running loss stands for each process's share
    st.progress = EpochProgress(steps_done * cfg.accumulate, p.loss_sum * scale, int(round(p.images * scale)),
                                p.seconds, steps_done * layout.global_batch)
    share = (st.epoch + in_epoch / max(1, old.images_per_epoch)) / cfg.epochs
    return st.epoch * layout.steps_per_epoch + steps_done, (
        f"fold {fold}: resuming on {layout.describe()} (was {old.describe(short=True)}): "
        f"{share:.0%} of training done by samples seen (epoch {st.epoch + 1}, {in_epoch} of {old.images_per_epoch} "
        f"images); the schedule continues from there")


def save_resume(path: Path, previous: Path, cfg: TrainConfig, core: torch.nn.Module, fold: int, trainer: Trainer,
                st: FoldState, rngs: list, layout: Layout) -> None:
    values = st.to_dict()
    epoch = values.pop("epoch")
    ema = trainer.ema.module.state_dict() if trainer.ema is not None else None
    save_rotating(path, previous, make_state(
        cfg, core, fold, epoch, optimizer=trainer.optimizer.state_dict(), scheduler=trainer.scheduler.state_dict(),
        scaler=trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None, rng=rngs,
        ema_state_dict=None if ema is None else {k: v.detach().cpu() for k, v in ema.items()},
        layout=st.layout_record(layout, trainer.scheduler.last_epoch), **values,
    ))
