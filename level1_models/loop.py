"""The training loop of one epoch, and what feeds it: seeded batches, the loss, optimiser, schedule.

Batches. An epoch is a seeded permutation of the training images cut into the images of each
optimiser step (``batch_size x world_size x accumulate``), each cut into ``accumulate`` *global
micro-batches*; process ``r`` of ``W`` takes every W-th image of a micro-batch, so ``BATCH`` is the
batch per GPU.

Determinism. The DataLoader is built once per fold with persistent workers; what an epoch reads is
set on its batch sampler. Each batch carries its own seed, and the worker that loads it reseeds the
augmentations with it, so what an image looks like depends on (seed, fold, epoch, batch) only, not
on which worker loads it or whether the run was resumed in the middle of the epoch.
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from competition.constants import LABEL_WEIGHTS
from level1_models.config import TrainConfig
from level1_models.distributed import DistEnv, all_reduce_sum
from level1_models.predict import autocast, loader_options, model_input
from level1_models.tracking import FoldWatch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    env: DistEnv
    amp: str  # bf16 | fp16 | off
    channels_last: bool

    def log(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()


def epoch_batches(n: int, batch_size: int, seed: int, fraction: float = 1.0) -> list[np.ndarray]:
    """Global batches of one epoch: a seeded permutation cut into full batches (one short batch
    only when there are fewer images than a batch). ``fraction`` < 1 keeps the permutation's first
    share of the images (at least one batch): a short epoch drawing a new sample each time."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    if fraction < 1.0:
        perm = perm[: max(min(n, batch_size), int(round(n * fraction)))]
    if len(perm) < batch_size:
        return [perm]
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(len(perm) // batch_size)]


def epoch_micro_batches(n: int, batch_size: int, world_size: int, accumulate: int, seed: int,
                        fraction: float = 1.0) -> list[np.ndarray]:
    """The global micro-batches of one epoch: each optimiser step's images (``batch_size x
    world_size x accumulate`` of the seeded permutation) split into ``accumulate`` parts. Micro-batch
    ``m`` belongs to step ``m // accumulate``."""
    steps = epoch_batches(n, batch_size * world_size * accumulate, seed, fraction)
    return [part for step in steps for part in np.array_split(step, min(accumulate, len(step)))]


def batch_seed(epoch_seed: int, step: int) -> int:
    # Python's hash of a tuple of ints does not depend on PYTHONHASHSEED.
    return hash((epoch_seed, step)) & 0x7FFFFFFF


class EpochSampler(Sampler):
    """Batch sampler of one process: this epoch's global batches from ``start`` on, its share of each.
    An item is ``(index, seed)``; the seed is set on the first item of a batch only."""

    def __init__(self, env: DistEnv):
        self.env = env
        self.batches: list[np.ndarray] = []
        self.seed, self.start = 0, 0

    def set_epoch(self, batches: list[np.ndarray], seed: int, start: int = 0) -> None:
        self.batches, self.seed, self.start = batches, seed, start

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        for step in range(self.start, len(self.batches)):
            local = self.batches[step][self.env.rank :: self.env.world_size].tolist()
            yield [(i, batch_seed(self.seed, step) if j == 0 else None) for j, i in enumerate(local)]

    def __len__(self) -> int:
        return len(self.batches) - self.start


class SeededItems(Dataset):
    """``ds[(index, seed)]``: reseed the random state (and the dataset's augmenter) when a seed
    comes, then return ``base[index]``."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int | None]):
        index, seed = key
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            reseed = getattr(self.base, "reseed", None)
            if reseed is not None:
                reseed(seed)
        return self.base[index]


def train_loader(dataset: Dataset, sampler: EpochSampler, cfg: TrainConfig, device: torch.device) -> DataLoader:
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, **loader_options(cfg.workers, device, True, cfg.prefetch))


def weighted_bce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over images of the per-image loss: BCE per label, weighted by ``weights`` and divided by
    their total. With the metric's weights (``any`` x2) the mean over images is the competition
    metric; with equal weights it is plain BCE."""
    per_pair = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (per_pair * weights).sum() / weights.sum()


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """``lr`` defaults to the spec's; the training loop passes it scaled to the global batch."""
    lr = cfg.lr if lr is None else lr
    # No weight decay on biases and normalisation parameters (1-d tensors).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The lr multiplier of optimiser step ``step`` (from 0): a linear warmup, then
    - cosine: one cosine from 1 to ``min_lr_ratio`` over the remaining steps;
    - cosine_restarts: cosines of ``restart_epochs`` epochs each, restarting at 1 (1st place, 2019);
    - step: ``lr_gamma`` to the power of the ``lr_milestones`` passed (epochs finished);
    - constant: 1."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    floor = cfg.min_lr_ratio

    def cosine(progress: float) -> float:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        if cfg.scheduler == "step":
            return cfg.lr_gamma ** sum(step >= m * steps_per_epoch for m in cfg.lr_milestones)
        if cfg.scheduler == "cosine_restarts":
            period = max(1, int(round(cfg.restart_epochs * steps_per_epoch)))
            return cosine(((step - warmup) % period) / period)
        return cosine((step - warmup) / max(1, total - warmup))

    return factor


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per optimiser step, the multiplier of :func:`lr_schedule`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, steps_per_epoch))


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lr: float, step: int) -> None:
    """Put ``scheduler`` (and its optimiser's lr) at optimiser step ``step`` of its schedule, from
    base lr ``base_lr``: where a resume on another global batch continues (the optimiser's moment
    estimates, per parameter, are kept; only its lr is set)."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [base_lr] * len(groups)
    scheduler.last_epoch = step
    for group, factor in zip(groups, scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in groups]


@dataclass
class EpochProgress:
    """Where an epoch stands; saved in mid-epoch checkpoints so a resumed epoch goes on from here."""

    step: int = 0  # micro-batches finished (always at an optimiser step boundary)
    loss_sum: float = 0.0  # this process's summed per-image loss
    images: int = 0  # this process's images so far
    seconds: float = 0.0
    samples: int = 0  # images of the epoch's batches finished, all processes together


@dataclass
class EpochResult:
    train_loss: float
    images_per_s: float
    seconds: float
    data_wait_share: float | None = None  # time blocked on the loader / this session's epoch time


class WeightAverage:
    """An exponential moving average of a model's weights (timm's ModelEmaV3, with its warmup so
    that short runs average only their later steps): updated after every optimiser step."""

    def __init__(self, core: torch.nn.Module, decay: float):
        from timm.utils import ModelEmaV3

        self.core = core
        self.average = ModelEmaV3(core, decay=decay, use_warmup=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.average.module

    def update(self, step: int) -> None:
        self.average.update(self.core, step=step)


@dataclass
class Trainer:
    """What one optimiser step needs; built once per fold."""

    cfg: TrainConfig
    rt: Runtime
    model: torch.nn.Module  # what the forward pass calls (DDP and/or compiled)
    parameters: Sequence[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None = None

    def __post_init__(self) -> None:
        # The loss's label weights (the metric's, or equal), on the device once, not every step.
        weights = LABEL_WEIGHTS if self.cfg.loss == "metric" else [1.0] * len(LABEL_WEIGHTS)
        self.label_weights = torch.as_tensor(weights, dtype=torch.float32, device=self.rt.device)

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, scale: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed per-image loss (detached)."""
        device = self.rt.device
        x = model_input(x, device, self.rt.channels_last)
        y = y.to(device, non_blocking=True)
        no_sync = isinstance(self.model, DistributedDataParallel) and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(device, self.rt.amp):
                logits = self.model(x)
            loss_sum = weighted_bce_sum(logits, y, self.label_weights)
            self.scaler.scale(loss_sum * scale).backward()
        return loss_sum.detach()

    def optimizer_step(self) -> None:
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.scheduler.last_epoch)  # optimiser steps taken: the average's warmup clock


class TimedBatches:
    """Iterates a loader and adds up the seconds spent blocked on its next batch (``wait``)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.wait = loader, 0.0

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield item


def train_one_epoch(
    trainer: Trainer,
    loader: DataLoader,
    batches: list[np.ndarray],
    progress: EpochProgress,
    on_step: Callable[[EpochProgress], None] | None = None,
    desc: str = "",
    watch: FoldWatch | None = None,
) -> EpochResult:
    """Train over ``batches`` from ``progress.step`` on (the loader's sampler is set to the same
    start); ``on_step`` runs after every optimiser step (mid-epoch checkpoints); ``watch`` gets each
    step's figures (tracker scalars, progress lines when stderr is no terminal, the bar's ETAs)."""
    cfg, env, device = trainer.cfg, trainer.rt.env, trainer.rt.device
    trainer.model.train()
    acc = cfg.accumulate
    n_images = sum(len(b) for b in batches)
    done_images = sum(len(b) for b in batches[: progress.step])
    # A log file gets plain lines (FoldWatch.step), not the bar's carriage-return frames.
    bar = tqdm(total=n_images, initial=done_images, desc=desc, unit="img", leave=False,
               disable=not env.is_main or not FoldWatch.draw_bar(), dynamic_ncols=True, file=sys.stderr)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter() - progress.seconds
    resumed_seconds, feed = progress.seconds, TimedBatches(loader)
    for (x, y), step in zip(feed, range(progress.step, len(batches))):
        group = range((step // acc) * acc, min(len(batches), (step // acc + 1) * acc))
        group_images = sum(len(batches[j]) for j in group)
        last_of_group = step == group[-1]
        # DDP averages gradients over processes: scaling each process's sum by W / images of the
        # optimiser step makes that average the single-process mean over the step's images.
        loss_total += trainer.micro_step(x, y, env.world_size / group_images, sync=last_of_group).double()
        progress.images += len(x)
        done_images += len(batches[step])
        bar.update(len(batches[step]))
        if last_of_group:
            lr = float(trainer.optimizer.param_groups[0]["lr"])  # the lr this step trains at
            trainer.optimizer_step()
            progress.step = step + 1
            progress.samples += group_images
            step_loss = float(loss_total.item())  # syncs once per optimiser step
            progress.loss_sum += step_loss
            loss_total.zero_()
            progress.seconds = time.perf_counter() - start
            mean_loss = progress.loss_sum / max(1, progress.images)
            rate = done_images / max(progress.seconds, 1e-9)
            postfix = f"loss={mean_loss:.4f}, img_s={rate:.1f}"
            if watch is not None:
                local = sum(len(batches[j][env.rank :: env.world_size]) for j in group)
                eta = watch.step(trainer.scheduler.last_epoch, step_loss / max(1, local), lr, done_images, n_images,
                                 rate, mean_loss, desc)
                postfix += f", {eta}" if eta else ""
            bar.set_postfix_str(postfix)
            if on_step is not None:
                on_step(progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    total, count = all_reduce_sum([progress.loss_sum, float(progress.images)], env, device)
    return EpochResult(total / max(count, 1.0), n_images / max(seconds, 1e-9), seconds,
                       feed.wait / max(seconds - resumed_seconds, 1e-9))
