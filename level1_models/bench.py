"""``make bench-train MODEL=...``: training and inference images/s at the spec's size, and the share
of time the model waits for data.

The same model runs twice: fed from random tensors already on the device (the compute ceiling) and
fed from the real DataLoader (cache reads, windowing, augmentation in ``workers`` processes). The
wait share is the time spent blocked on the next batch over the whole loop; if the data-fed rate is
well below the random-tensor rate, add workers or a smaller cache size. One line per figure,
``name: value unit``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from features.windows import n_channels
from level1_models.config import TrainConfig
from level1_models.data import RunInputs
from level1_models.loop import Runtime, Trainer, make_optimizer
from level1_models.modeling import build_model
from level1_models.predict import AMP_DTYPES, autocast, loader_options, model_input


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_loop(batches: Iterator, step: Callable[[torch.Tensor, torch.Tensor], None], n_steps: int, warmup: int,
                device: torch.device) -> tuple[float, float, int]:
    """Run warmup + n_steps steps; returns (seconds, seconds waiting for batches, images) of the timed part."""
    total = wait = 0.0
    images = 0
    for i in range(warmup + n_steps):
        t0 = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        t1 = time.perf_counter()
        step(x, y)
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            total += t2 - t0
            wait += t1 - t0
            images += len(x)
    return total, wait, images


def run_bench(cfg: TrainConfig, rt: Runtime, inputs: RunInputs | None, steps: int = 20, warmup: int = 3) -> dict[str, float]:
    device = rt.device
    model = build_model(cfg, use_pretrained=False, announce=False).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=AMP_DTYPES[rt.amp] is torch.float16)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # The training loop's own step (loop.Trainer): one process, no accumulation.
    trainer = Trainer(cfg, rt, fwd, list(model.parameters()), optimizer, constant, scaler)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        trainer.micro_step(x, y, 1.0 / len(x), sync=True)
        trainer.optimizer_step()

    @torch.no_grad()
    def infer_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, rt.amp):
            fwd(model_input(x, device, rt.channels_last))

    shape = (n_channels(cfg.combination), cfg.img_size, cfg.img_size)

    def random_batches(batch: int) -> Iterator:
        x = torch.rand(batch, *shape, device=device)
        y = (torch.rand(batch, 6, device=device) < 0.1).float()
        while True:
            yield x, y

    out: dict[str, float] = {}
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, _, images = _timed_loop(random_batches(cfg.batch_size), train_step, steps, warmup, device)
    out["train_random_tensors"] = images / seconds
    if device.type == "cuda":  # what this batch needs on the GPU: weights, optimiser state, activations
        out["train_peak_memory"] = torch.cuda.max_memory_allocated(device) / 2**20
    model.eval()
    seconds, _, images = _timed_loop(random_batches(cfg.eval_batch), infer_step, steps, warmup, device)
    out["infer_random_tensors"] = images / seconds

    if inputs is not None:
        ids = inputs.folds["image_id"].tolist()
        need = (steps + warmup) * max(cfg.batch_size, cfg.eval_batch)
        ids = [ids[i] for i in np.random.default_rng(cfg.seed).permutation(len(ids))[:need]]
        # The loaders of training: persistent workers, pinned memory, prefetch (predict.loader_options).
        # One pass covers every timed step (sampling with replacement from a small dataset), so an
        # epoch end never drains the pipeline in the middle of the measurement.
        options = loader_options(cfg.workers, device, True, cfg.prefetch)
        rng = torch.Generator().manual_seed(cfg.seed)
        train_ds: Dataset = inputs.datasets(ids, labeled=True, augment=cfg.augment)
        sampler = RandomSampler(train_ds, replacement=True, num_samples=(steps + warmup) * cfg.batch_size, generator=rng)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **options)
        model.train()
        seconds, wait, images = _timed_loop(iter(loader), train_step, steps, warmup, device)
        out["train_data_loader"] = images / seconds
        out["train_data_wait"] = 100.0 * wait / seconds
        eval_ds = inputs.datasets(ids, labeled=True, augment=False)
        order = np.resize(np.arange(len(ids)), (steps + warmup) * cfg.eval_batch).tolist()
        loader = DataLoader(Subset(eval_ds, order), batch_size=cfg.eval_batch, **options)
        model.eval()
        seconds, wait, images = _timed_loop(iter(loader), infer_step, steps, warmup, device)
        out["infer_data_loader"] = images / seconds
        out["infer_data_wait"] = 100.0 * wait / seconds
    return out


def print_bench(cfg: TrainConfig, rt: Runtime, figures: dict[str, float]) -> None:
    print(f"bench_model: {cfg.name} ({cfg.arch}, {n_channels(cfg.combination)} ch, {cfg.img_size} px, "
          f"batch {cfg.batch_size}, {rt.device}, amp {rt.amp}, workers {cfg.workers})")
    for name, value in figures.items():
        unit = "%" if name.endswith("_wait") else "MiB" if name.endswith("_memory") else "images/s"
        print(f"{name}: {value:.1f} {unit}")
