"""K-fold training of one level-1 model -> out-of-fold and test predictions the stacker can trust.

Per fold: train on the other folds' images, validate every epoch on this fold (with TTA), keep the
checkpoint with the best validation weighted log loss, stop early after ``patience`` epochs without
improvement, then predict this fold's images (OOF) and the test images with the best checkpoint.

Resumable: a finished fold is marked by ``fold<k>/done.json`` (written last) and kept; an
unfinished fold restarts from ``fold<k>/last.pt`` (written after every epoch with the optimiser,
schedule and curve so far). Each epoch's data order and random state derive from (seed, fold,
epoch), so a resumed run repeats what the killed one would have done. Every file is written
atomically.
"""
from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from competition.constants import LABEL_WEIGHTS, LABELS
from competition.metric import weighted_log_loss
from competition.paths import WorkPaths
from level1_models.atomic import remove_stale_temporaries, write_json, write_parquet
from level1_models.checkpoint import load_checkpoint, load_weights, make_state, save_checkpoint
from level1_models.config import IDENTITY_FIELDS, ConfigError, TrainConfig, read_config, resolve
from level1_models.curves import plot_curves, write_curve
from level1_models.data import RunInputs
from level1_models.distributed import DistEnv, all_reduce_sum, barrier, env_from_torchrun, init_distributed
from level1_models.metrics import prior_score, score
from level1_models.modeling import build_model, find_weights
from level1_models.predict import AMP_DTYPES, autocast, predict_sharded

# (fold, epoch, curve row) -> None; called on every process after each epoch's files are written.
EpochCallback = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class ModelFolder:
    """The files of one model's output folder (``WorkPaths.model_dir(name)``)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def oof(self) -> Path:
        return self.root / "oof.parquet"

    @property
    def test(self) -> Path:
        return self.root / "test.parquet"

    @property
    def curves_png(self) -> Path:
        return self.root / "curves.png"

    def curves_csv(self, fold: int) -> Path:
        return self.root / f"curves_fold{fold}.csv"

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold{fold}"

    def best(self, fold: int) -> Path:
        return self.fold_dir(fold) / "best.pt"

    def last(self, fold: int) -> Path:
        return self.fold_dir(fold) / "last.pt"

    def fold_oof(self, fold: int) -> Path:
        return self.fold_dir(fold) / "oof.parquet"

    def fold_test(self, fold: int) -> Path:
        return self.fold_dir(fold) / "test.parquet"

    def fold_done(self, fold: int) -> Path:
        return self.fold_dir(fold) / "done.json"


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


def setup_runtime(cfg: TrainConfig) -> tuple[TrainConfig, Runtime]:
    """Resolve the config for this machine and join torchrun's process group if there is one."""
    env = env_from_torchrun()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    cfg = resolve(cfg, cuda_available=cuda, bf16_supported=bf16, local_rank=env.local_rank)
    device = torch.device(cfg.device)
    env = init_distributed(device.type)
    if cfg.batch_size % env.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by {env.world_size} processes; "
                          f"pick a multiple (the global batch is split evenly)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return cfg, Runtime(device=device, env=env, amp=cfg.amp, channels_last=cfg.channels_last)


def stage_seed(cfg: TrainConfig, fold: int, stage: int) -> int:
    """The seed of one stage of a fold: 0 = model initialisation, e = epoch e (numbered from 1)."""
    return int(np.random.SeedSequence([cfg.seed, fold, stage]).generate_state(1)[0])


def epoch_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Global batches of one epoch: a seeded permutation cut into full batches (one short batch
    only when there are fewer images than a batch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    if n < batch_size:
        return [perm]
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(n // batch_size)]


def weighted_bce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over images of the metric's per-image loss: BCE per label, weighted like the metric
    (``any`` x2), divided by the weight total. Mean over images = the competition metric."""
    per_pair = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (per_pair * weights).sum() / weights.sum()


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation parameters (1-d tensors).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warmup, then cosine decay to zero (or constant)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_head_bias(model: torch.nn.Module, rates: Sequence[float]) -> None:
    """Start the classifier at each label's log-odds: the first predictions are the constant prior
    instead of 0.5, which the weighted log loss punishes hard (and early epochs waste undoing)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear) and head.bias is not None and head.out_features == len(rates):
        p = torch.as_tensor(rates, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
        with torch.no_grad():
            head.bias.copy_(torch.log(p / (1 - p)).to(head.bias.dtype))


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train_one_epoch(
    cfg: TrainConfig,
    rt: Runtime,
    train_model: torch.nn.Module,
    parameters: Sequence[torch.nn.Parameter],
    dataset: Dataset,
    batches: list[np.ndarray],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    desc: str,
) -> tuple[float, float, float]:
    """One pass over ``batches``; returns (mean train loss, images/s, seconds) over all processes."""
    env, device = rt.env, rt.device
    train_model.train()
    local = [b[env.rank :: env.world_size].tolist() for b in batches]
    loader = DataLoader(dataset, batch_sampler=local, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    weights = torch.as_tensor(LABEL_WEIGHTS, dtype=torch.float32, device=device)
    n_images = sum(len(b) for b in batches)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    seen, seen_local = 0, 0
    bar = tqdm(total=n_images, desc=desc, unit="img", disable=not env.is_main, leave=False, dynamic_ncols=True,
               file=sys.stderr)
    start = time.perf_counter()
    for step, ((x, y), global_batch) in enumerate(zip(loader, batches)):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, rt.amp):
            logits = train_model(x)
        loss_sum = weighted_bce_sum(logits, y, weights)
        # DDP averages gradients over processes: scaling each process's sum by W / global batch
        # makes that average the single-process mean over the global batch.
        loss = loss_sum * (env.world_size / len(global_batch))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_total += loss_sum.detach().double()
        seen += len(global_batch)
        seen_local += len(x)
        bar.update(len(global_batch))
        if step % 10 == 0 or seen == n_images:
            elapsed = time.perf_counter() - start
            # Running loss over this process's images (the epoch figure is reduced over all below).
            bar.set_postfix(loss=f"{loss_total.item() / max(1, seen_local):.4f}", img_s=f"{seen / max(elapsed, 1e-9):.1f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    total, count = all_reduce_sum([loss_total.item(), float(seen_local)], env, device)
    return total / max(count, 1.0), n_images / max(seconds, 1e-9), seconds


def _prior_rates(y: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(y, dtype=np.float64).mean(axis=0)]


def train_fold(
    cfg: TrainConfig,
    fold: int,
    inputs: RunInputs,
    folder: ModelFolder,
    rt: Runtime,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train one fold (or resume it), then write its OOF and test predictions; returns its summary."""
    env, device = rt.env, rt.device
    done_path = folder.fold_done(fold)
    if done_path.is_file():
        summary = json.loads(done_path.read_text())
        rt.log(f"fold {fold}: finished earlier (best epoch {summary['best_epoch']}, val weighted log loss "
               f"{summary['metrics']['weighted_log_loss']:.4f}); kept")
        return summary
    t_fold = time.perf_counter()
    table = inputs.folds
    val_ids = table.loc[table["fold"] == fold, "image_id"].tolist()
    train_all = table.loc[table["fold"] != fold, "image_id"].tolist()
    train_ids = [i for i in train_all if inputs.trainable is None or i in inputs.trainable]
    if cfg.limit is not None and len(train_ids) > cfg.limit:
        pick = np.random.default_rng([cfg.seed, fold]).choice(len(train_ids), cfg.limit, replace=False)
        train_ids = [train_ids[i] for i in np.sort(pick)]
    if len(train_ids) < env.world_size or not val_ids:
        raise ValueError(f"fold {fold} has {len(train_ids)} training and {len(val_ids)} validation images; "
                         f"the folds table needs at least two non-empty folds")
    y_val = inputs.label_array(val_ids)
    prior_rates = _prior_rates(inputs.label_array(train_all))
    train_ds = inputs.datasets(train_ids, labeled=True, augment=cfg.augment)
    val_ds = inputs.datasets(val_ids, labeled=True, augment=False)

    last_path, best_path = folder.last(fold), folder.best(fold)
    resume = load_checkpoint(last_path) if last_path.is_file() else None
    seed_everything(stage_seed(cfg, fold, 0))  # the same initial weights on every process and rerun
    core = build_model(cfg, use_pretrained=resume is None, announce=env.is_main)
    if resume is None:
        init_head_bias(core, prior_rates)
    if env.enabled and has_batchnorm(core):
        if device.type == "cuda":
            core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
        elif fold == (cfg.folds or inputs.fold_numbers)[0]:
            rt.log(f"note: {cfg.arch} has BatchNorm; on CPU its batch statistics are per process "
                   f"(SyncBatchNorm needs GPUs), so results differ slightly from one process")
    if resume is not None:
        load_weights(core, resume, cfg, last_path)
    core.to(device)
    if rt.channels_last:
        core = core.to(memory_format=torch.channels_last)

    batches_per_epoch = len(epoch_batches(len(train_ids), cfg.batch_size, 0))
    optimizer = make_optimizer(cfg, core)
    scheduler = make_scheduler(cfg, optimizer, batches_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=AMP_DTYPES[rt.amp] is torch.float16)
    start_epoch, best_loss, best_epoch, bad_epochs, history = 0, math.inf, -1, 0, []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch = int(resume["epoch"])  # epochs finished = index of the next one
        best_loss, best_epoch = float(resume["best_loss"]), int(resume["best_epoch"])
        bad_epochs, history = int(resume["bad_epochs"]), list(resume["history"])
        rt.log(f"fold {fold}: resuming after epoch {start_epoch} from {last_path} "
               f"(best so far {best_loss:.4f} at epoch {best_epoch})")

    eval_model: torch.nn.Module = torch.compile(core) if cfg.compile else core
    train_model: torch.nn.Module = eval_model
    if env.enabled:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(eval_model, device_ids=ids)
    predict_kwargs = dict(batch_size=cfg.eval_batch, device=device, amp=rt.amp, channels_last=rt.channels_last,
                          tta=cfg.tta, workers=cfg.workers)

    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            break
        seed = stage_seed(cfg, fold, epoch + 1)
        seed_everything(seed + env.rank)
        # A fresh copy per epoch: a dataset's augmenter is built lazily from the epoch's seed.
        epoch_ds = copy.copy(train_ds)
        batches = epoch_batches(len(train_ids), cfg.batch_size, seed)
        train_loss, images_per_s, seconds = train_one_epoch(
            cfg, rt, train_model, list(core.parameters()), epoch_ds, batches, optimizer, scheduler, scaler,
            desc=f"{cfg.name} fold {fold} epoch {epoch + 1}/{cfg.epochs}",
        )
        val_pred = predict_sharded(eval_model, val_ds, env, **predict_kwargs)
        val_loss = weighted_log_loss(y_val, val_pred)
        improved = val_loss < best_loss
        number = epoch + 1  # epochs are numbered from 1 in files and logs
        if improved:
            best_loss, best_epoch, bad_epochs = val_loss, number, 0
        else:
            bad_epochs += 1
        row = {
            "epoch": number, "lr": float(optimizer.param_groups[0]["lr"]), "train_loss": float(train_loss),
            "val_weighted_log_loss": float(val_loss), "train_images_per_s": float(images_per_s),
            "epoch_seconds": float(seconds), "best": bool(improved),
        }
        history.append(row)
        if env.is_main:
            if improved:
                save_checkpoint(best_path, make_state(cfg, core, fold, number, val_weighted_log_loss=float(val_loss)))
            save_checkpoint(last_path, make_state(
                cfg, core, fold, number,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                best_loss=float(best_loss), best_epoch=best_epoch, bad_epochs=bad_epochs, history=history,
            ))
            write_curve(folder.curves_csv(fold), history)
        rt.log(f"{cfg.name} fold {fold} epoch {number}/{cfg.epochs}: train loss {train_loss:.4f}  "
               f"val weighted log loss {val_loss:.4f}{' *' if improved else ''}  {images_per_s:.1f} img/s")
        barrier(env)
        if on_epoch_end is not None:
            on_epoch_end(fold, number, row)
    barrier(env)

    # The fold's predictions come from its best checkpoint, whatever epoch training stopped at.
    best_state = load_checkpoint(best_path)
    load_weights(core, best_state, cfg, best_path)
    oof = predict_sharded(eval_model, val_ds, env, **predict_kwargs)
    test_ds = inputs.datasets(inputs.test_ids, labeled=False, augment=False)
    test = predict_sharded(eval_model, test_ds, env, **predict_kwargs)
    metrics = score(y_val, oof)
    prior = prior_score(inputs.label_array(train_all), y_val)
    summary = {
        "fold": fold,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "n_test": len(inputs.test_ids),
        "best_epoch": int(best_state["epoch"]),
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.epochs,
        "metrics": metrics,
        "prior_weighted_log_loss": prior,
        "prior_rates": prior_rates,
        "seconds": time.perf_counter() - t_fold,
        "world_size": env.world_size,
        "config": cfg.to_dict(),
    }
    if env.is_main:
        oof_frame = pd.DataFrame(oof, columns=list(LABELS))
        oof_frame.insert(0, "fold", np.int64(fold))
        oof_frame.insert(0, "image_id", val_ids)
        write_parquet(folder.fold_oof(fold), oof_frame)
        test_frame = pd.DataFrame(test, columns=list(LABELS))
        test_frame.insert(0, "image_id", inputs.test_ids)
        write_parquet(folder.fold_test(fold), test_frame)
        write_json(done_path, summary)  # last: marks the fold finished
        last_path.unlink(missing_ok=True)  # optimiser state is no longer needed
    barrier(env)
    rt.log(f"fold {fold}: best epoch {summary['best_epoch']}/{cfg.epochs}  OOF weighted log loss "
           f"{metrics['weighted_log_loss']:.4f} (constant prior {prior:.4f})  {len(train_ids)} train / "
           f"{len(val_ids)} val / {len(inputs.test_ids)} test images  {summary['seconds']:.1f} s")
    return summary


def check_same_model(folder: ModelFolder, cfg: TrainConfig) -> None:
    """A model folder holds one model: refuse to mix in a run whose architecture or input differs."""
    if not folder.config.is_file():
        return
    old = read_config(folder.config)
    diff = {k: (getattr(old, k), getattr(cfg, k)) for k in IDENTITY_FIELDS if getattr(old, k) != getattr(cfg, k)}
    if diff:
        text = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{folder.root} holds a run of {cfg.name} with other settings ({text}); "
                          f"delete that folder or pass another --work to train this variant")


def assemble(cfg: TrainConfig, inputs: RunInputs, folder: ModelFolder) -> dict[str, Any]:
    """Metrics over the finished folds; ``oof.parquet`` / ``test.parquet`` once every fold is done."""
    all_folds = inputs.fold_numbers
    done = {k: json.loads(folder.fold_done(k).read_text()) for k in all_folds if folder.fold_done(k).is_file()}
    oofs, tests = [], []
    for k in done:
        oof = pd.read_parquet(folder.fold_oof(k))
        expected = inputs.folds.loc[inputs.folds["fold"] == k, "image_id"]
        if len(oof) != len(expected) or set(oof["image_id"]) != set(expected):
            raise ValueError(f"{folder.fold_oof(k)} does not hold exactly fold {k}'s images (the folds table "
                             f"changed?); delete {folder.fold_dir(k)} and rerun that fold")
        oofs.append(oof)
        test = pd.read_parquet(folder.fold_test(k))
        if test["image_id"].tolist() != inputs.test_ids:
            raise ValueError(f"{folder.fold_test(k)} does not hold the sample submission's images; "
                             f"delete {folder.fold_dir(k)} and rerun that fold")
        tests.append(test)
    complete = bool(done) and len(done) == len(all_folds)
    metrics: dict[str, Any] = {
        "model": cfg.name, "arch": cfg.arch, "combination": cfg.combination,
        "complete": complete, "n_folds": len(all_folds), "folds_done": sorted(done),
        "folds": {str(k): {**s["metrics"], "best_epoch": s["best_epoch"], "epochs_run": s["epochs_run"],
                           "prior_weighted_log_loss": s["prior_weighted_log_loss"]} for k, s in sorted(done.items())},
    }
    if oofs:
        pooled = pd.concat(oofs, ignore_index=True).sort_values("image_id", ignore_index=True)
        y = inputs.label_array(pooled["image_id"])
        metrics["pooled"] = score(y, pooled[list(LABELS)].to_numpy())
        prior = np.array([done[int(f)]["prior_rates"] for f in pooled["fold"]])
        metrics["prior_baseline"] = {"weighted_log_loss": weighted_log_loss(y, prior),
                                     "note": "each fold's training label rates, predicted for every image"}
    write_json(folder.metrics, metrics)
    curves = {k: pd.read_csv(folder.curves_csv(k)) for k in all_folds if folder.curves_csv(k).is_file()}
    if curves:
        plot_curves(curves, folder.curves_png, f"{cfg.name} ({cfg.arch}, {cfg.combination}, {cfg.img_size} px)")
    if complete:
        pooled = pooled[["image_id", "fold", *LABELS]]
        if pooled["image_id"].duplicated().any() or set(pooled["image_id"]) != set(inputs.folds["image_id"]):
            raise ValueError("the OOF predictions do not cover every train image exactly once")
        write_parquet(folder.oof, pooled)
        mean = np.mean([t[list(LABELS)].to_numpy() for t in tests], axis=0)
        test_frame = pd.DataFrame(mean, columns=list(LABELS))
        test_frame.insert(0, "image_id", inputs.test_ids)
        write_parquet(folder.test, test_frame)
    else:
        # Stale whole-model files (e.g. a fold folder was deleted to retrain it) must not linger.
        folder.oof.unlink(missing_ok=True)
        folder.test.unlink(missing_ok=True)
    return metrics


def run_oof(
    cfg: TrainConfig,
    inputs: RunInputs,
    model_dir: Path,
    rt: Runtime,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, Any] | None:
    """Train the requested folds and assemble the model folder; returns the metrics on rank 0."""
    folder = ModelFolder(Path(model_dir))
    all_folds = inputs.fold_numbers
    todo = list(cfg.folds) if cfg.folds is not None else all_folds
    unknown = sorted(set(todo) - set(all_folds))
    if unknown:
        raise ConfigError(f"folds {unknown} are not in the folds table (it has folds {all_folds})")
    if rt.env.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder.root)
        check_same_model(folder, cfg)
        weights = find_weights(cfg)
        write_json(folder.config, {**cfg.to_dict(), "runtime": {
            "world_size": rt.env.world_size, "torch": torch.__version__, "timm": _timm_version(),
            "pretrained_weights": str(weights) if weights else None, "n_folds": len(all_folds),
        }})
    barrier(rt.env)
    for fold in todo:
        train_fold(cfg, fold, inputs, folder, rt, on_epoch_end)
    metrics = assemble(cfg, inputs, folder) if rt.env.is_main else None
    barrier(rt.env)
    if metrics is not None:
        if metrics["complete"]:
            rt.log(f"{cfg.name}: OOF weighted log loss {metrics['pooled']['weighted_log_loss']:.4f} over "
                   f"{metrics['n_folds']} folds (constant prior {metrics['prior_baseline']['weighted_log_loss']:.4f}); "
                   f"wrote {folder.oof} and {folder.test}")
        else:
            missing = sorted(set(all_folds) - set(metrics["folds_done"]))
            rt.log(f"{cfg.name}: folds {metrics['folds_done']} done; oof.parquet and test.parquet are written "
                   f"when folds {missing} are done too (metrics so far in {folder.metrics})")
    return metrics


def _timm_version() -> str:
    import timm

    return timm.__version__


def run_model(
    name: str,
    data_dir: Path | str,
    work_dir: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, Any] | None:
    """``make oof MODEL=name``: the spec with overrides, trained K-fold on a prepared dataset."""
    from level1_models.config import build_config
    from level1_models.data import load_inputs

    cfg, rt = setup_runtime(build_config(name, overrides))
    paths = WorkPaths.for_data(data_dir, work_dir)
    inputs = load_inputs(data_dir, paths, cfg.combination, cfg.img_size)
    return run_oof(cfg, inputs, paths.model_dir(name), rt, on_epoch_end)

