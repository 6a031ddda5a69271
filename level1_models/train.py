"""K-fold training of one level-1 model -> out-of-fold and test predictions the stacker can trust.

Per fold: train on the other folds' readable images, validate every epoch on this fold's
(``val_tta``, none by default), keep the checkpoint with the best validation weighted log loss, stop early after
``patience`` epochs without improvement, then predict this fold's images (OOF) and the test
images with the best checkpoint, and save their pooled features (embeddings) for level 2.

Resumable: a finished fold is marked by ``fold<k>/done.json`` (written last) and kept; an
unfinished fold resumes from ``fold<k>/last.pt``, written after every epoch and every
``checkpoint_minutes`` within one (an unreadable ``last.pt`` falls back to ``last.prev.pt``).
What each batch holds and how it is augmented derive from (seed, fold, epoch, batch), so a
resumed run repeats what the killed one would have done. ``last.pt`` also records its layout (GPU
count, batch, accumulation, steps per epoch, images seen): a resume on another layout continues at
the same share of training by images seen, one on another schedule is refused (``recut_resume``).
Every file is written atomically.

The loop itself is in ``loop.py``; this module is its bookkeeping: the fold's inputs, network,
trainer, epochs, checkpoints and per-fold outputs. The resume state is in ``resume.py``, the
model folder's assembly in ``assembly.py``, progress and the experiment log in ``tracking.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel

from competition.constants import LABELS
from competition.metric import weighted_log_loss
from competition.paths import WorkPaths
from features.windows import n_channels
from level1_models.assembly import assemble, check_same_model
from level1_models.atomic import write_json, write_parquet
from level1_models.checkpoint import load_checkpoint, load_resume_state, load_weights, make_state, save_checkpoint
from level1_models.config import ConfigError, TrainConfig, resolve
from level1_models.curves import write_curve
from level1_models.data import RunInputs
from level1_models.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    env_from_torchrun,
    gather_objects,
    init_distributed,
    shard,
)
from level1_models.finished import mark_assembled
from level1_models.fold_locks import (
    LockHeldError,
    ModelLocks,
    holder_line,
    remove_fold_temporaries,
    remove_shared_temporaries,
)
from level1_models.folder import ModelFolder
from level1_models.loop import (
    EpochProgress,
    EpochResult,
    EpochSampler,
    Runtime,
    Trainer,
    WeightAverage,
    epoch_batches,
    make_optimizer,
    make_scheduler,
    epoch_micro_batches,
    set_schedule_position,
    train_loader,
    train_one_epoch,
    weighted_bce_sum,
)
from level1_models.metrics import prior_score, score
from level1_models.modeling import build_model, find_weights
from level1_models.predict import AMP_DTYPES, embedding_width, eval_loader, predict_sharded
from level1_models.resume import (
    CheckpointClock,
    FoldState,
    Layout,
    recut_resume,
    restore_rng,
    rng_state,
    save_resume,
)
from level1_models.tracking import RunWatch, check_tracker

__all__ = ["ModelFolder", "Runtime", "epoch_batches", "make_optimizer", "make_scheduler", "run_oof", "run_model",
           "setup_runtime", "weighted_bce_sum"]

# (fold, epoch, curve row) -> None; called on every process after each epoch's files are written.
EpochCallback = Callable[[int, int, dict], None]


def setup_runtime(cfg: TrainConfig) -> tuple[TrainConfig, Runtime]:
    """Resolve the config for this machine and join torchrun's process group if there is one."""
    env = env_from_torchrun()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cfg = resolve(cfg, cuda_available=cuda, bf16_supported=bf16, local_rank=env.local_rank,
                  local_processes=local_processes)
    device = torch.device(cfg.device)
    env = init_distributed(device.type)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return cfg, Runtime(device=device, env=env, amp=cfg.amp, channels_last=cfg.channels_last)


def stage_seed(cfg: TrainConfig, fold: int, stage: int) -> int:
    """The seed of one stage of a fold: 0 = model initialisation, e = epoch e (numbered from 1)."""
    return int(np.random.SeedSequence([cfg.seed, fold, stage]).generate_state(1)[0])


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


def _prior_rates(y: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(y, dtype=np.float64).mean(axis=0)]


@dataclass
class FoldData:
    """One fold's images: what it trains on, what it validates on, what it predicts."""

    fold: int
    train_ids: list[str]
    val_ids: list[str]  # every held-out image (the OOF rows, in this order)
    val_readable: np.ndarray  # bool per val_ids: in the cache (unreadable ones get the prior)
    test_readable: np.ndarray  # bool per inputs.test_ids
    prior_rates: list[float]

    @classmethod
    def build(cls, cfg: TrainConfig, fold: int, inputs: RunInputs, env: DistEnv) -> "FoldData":
        table = inputs.folds
        def readable(ids: list[str]) -> np.ndarray:
            if inputs.trainable is None:
                return np.ones(len(ids), dtype=bool)
            return np.array([i in inputs.trainable for i in ids], dtype=bool)

        val_ids = table.loc[table["fold"] == fold, "image_id"].tolist()
        train_all = table.loc[table["fold"] != fold, "image_id"].tolist()
        train_ids = [i for i, ok in zip(train_all, readable(train_all)) if ok]
        if cfg.limit is not None and len(train_ids) > cfg.limit:
            pick = np.random.default_rng([cfg.seed, fold]).choice(len(train_ids), cfg.limit, replace=False)
            train_ids = [train_ids[i] for i in np.sort(pick)]
        val_readable = readable(val_ids)
        if len(train_ids) < env.world_size or not val_readable.any():
            raise ValueError(f"fold {fold} has {len(train_ids)} readable training and {int(val_readable.sum())} "
                             f"readable validation images; the folds table needs at least two non-empty folds")
        test_readable = readable(inputs.test_ids)
        if len(test_readable) and not test_readable.any():
            raise ValueError(f"none of the {len(test_readable)} test images is in the image cache; build it for the "
                             f"test images too (make cache DATA=<data>) before training")
        return cls(fold, train_ids, val_ids, val_readable, test_readable, _prior_rates(inputs.label_array(train_all)))


def build_network(cfg: TrainConfig, fold: int, fd: FoldData, rt: Runtime, resume: dict | None,
                  path: Path, first_fold: bool) -> torch.nn.Module:
    """The fold's network on its device: ImageNet weights and the prior head for a new fold, the
    checkpoint's weights for a resumed one."""
    env, device = rt.env, rt.device
    seed_everything(stage_seed(cfg, fold, 0))  # the same initial weights on every process and rerun
    # Where the weights came from is said once per run, not once per fold.
    core = build_model(cfg, use_pretrained=resume is None, announce=env.is_main and first_fold)
    if resume is None:
        init_head_bias(core, fd.prior_rates)
    if env.enabled and has_batchnorm(core):
        if device.type == "cuda":
            if cfg.sync_bn:
                core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
        elif first_fold:
            rt.log(f"note: {cfg.arch} has BatchNorm; on CPU its batch statistics are per process "
                   f"(SyncBatchNorm needs GPUs), so results differ slightly from one process")
    if resume is not None:
        load_weights(core, resume, cfg, path)
    core.to(device)
    return core.to(memory_format=torch.channels_last) if rt.channels_last else core


def make_trainer(cfg: TrainConfig, rt: Runtime, core: torch.nn.Module, layout: Layout,
                 resume: dict | None, position: int | None = None) -> tuple[Trainer, torch.nn.Module]:
    """Optimiser (lr scaled to the global batch), schedule, scaler, the DDP / compiled wrappers;
    returns the trainer and the model to predict with. ``position``: a resume on another layout
    continues this run's schedule at that optimiser step (see :func:`recut_resume`)."""
    world = rt.env.world_size
    base_lr = cfg.lr * cfg.lr_factor(world)
    optimizer = make_optimizer(cfg, core, base_lr)
    scheduler = make_scheduler(cfg, optimizer, layout.steps_per_epoch)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=AMP_DTYPES[rt.amp] is torch.float16)
    ema = WeightAverage(core, cfg.ema) if cfg.ema > 0 else None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if position is None:
            scheduler.load_state_dict(resume["scheduler"])
        else:
            set_schedule_position(scheduler, base_lr, position)
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if ema is not None and resume.get("ema_state_dict") is not None:
            ema.module.load_state_dict(resume["ema_state_dict"])
    eval_model: torch.nn.Module = torch.compile(core) if cfg.compile else core
    train_model = eval_model
    if rt.env.enabled:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = DistributedDataParallel(eval_model, device_ids=ids)
    trainer = Trainer(cfg, rt, train_model, list(core.parameters()), optimizer, scheduler, scaler, ema)
    return trainer, eval_model


def judged_model(trainer: Trainer, model: torch.nn.Module) -> torch.nn.Module:
    """What is validated, kept as best.pt and predicted with: the weight average when there is one,
    else ``model``."""
    return trainer.ema.module if trainer.ema is not None else model


def record_epoch(cfg: TrainConfig, rt: Runtime, folder: ModelFolder, fold: int, core: torch.nn.Module,
                 trainer: Trainer, st: FoldState, result: EpochResult, val_loss: float, layout: Layout,
                 note: str = "") -> dict:
    """After an epoch's validation: early-stopping state, curve row, best and resume checkpoints, log
    (``note`` ends its line: the ETAs)."""
    number = st.epoch + 1
    improved = val_loss < st.best_loss
    if improved:
        st.best_loss, st.best_epoch, st.bad_epochs = val_loss, number, 0
    else:
        st.bad_epochs += 1
    row = {
        "epoch": number, "lr": float(trainer.optimizer.param_groups[0]["lr"]), "train_loss": result.train_loss,
        "val_weighted_log_loss": float(val_loss), "train_images_per_s": result.images_per_s,
        "epoch_seconds": result.seconds, "best": bool(improved),
    }
    st.history.append(row)
    st.epoch, st.samples, st.progress = number, st.samples + st.progress.samples, EpochProgress()
    if rt.env.is_main:
        # The weights that were validated (the average, with ema), from the uncompiled core: the best
        # epoch's, or with select=last every epoch's in turn (the final one stays).
        if improved or cfg.select == "last":
            save_checkpoint(folder.best(fold), make_state(cfg, judged_model(trainer, core), fold, number,
                                                          val_weighted_log_loss=float(val_loss)))
        save_resume(folder.last(fold), folder.previous(fold), cfg, core, fold, trainer, st, [], layout)
        write_curve(folder.curves_csv(fold), st.history)
    rt.log(f"{cfg.name} fold {fold} epoch {number}/{cfg.epochs}: train loss {result.train_loss:.4f}  "
           f"val weighted log loss {val_loss:.4f}{' *' if improved else ''}  {result.images_per_s:.1f} img/s{note}")
    return row


def train_fold(
    cfg: TrainConfig,
    fold: int,
    inputs: RunInputs,
    folder: ModelFolder,
    rt: Runtime,
    on_epoch_end: EpochCallback | None = None,
    watch: RunWatch | None = None,
) -> dict[str, Any]:
    """Train one fold (or resume it), then write its OOF and test predictions; returns its summary.
    ``watch``: the run's ETAs, progress lines and tracker (level1_models/tracking.py)."""
    env, device = rt.env, rt.device
    if folder.fold_done(fold).is_file():
        summary = json.loads(folder.fold_done(fold).read_text())
        rt.log(f"fold {fold}: finished earlier (best epoch {summary['best_epoch']}, val weighted log loss "
               f"{summary['metrics']['weighted_log_loss']:.4f}); kept")
        return summary
    t_fold = time.perf_counter()
    fd = FoldData.build(cfg, fold, inputs, env)
    val_ids = [i for i, ok in zip(fd.val_ids, fd.val_readable) if ok]
    y_val = inputs.label_array(val_ids)
    train_ds = inputs.datasets(fd.train_ids, labeled=True, augment=cfg.augment)
    val_ds = inputs.datasets(val_ids, labeled=True, augment=False)

    last, previous = folder.last(fold), folder.previous(fold)
    resume, note = load_resume_state(last, previous)
    if note:
        rt.log(f"fold {fold}: {note}")
    first_fold = fold == (cfg.folds or inputs.fold_numbers)[0]
    layout = Layout.of(cfg, env.world_size, len(fd.train_ids))
    st = FoldState.from_checkpoint(resume) if resume is not None else FoldState()
    recut = recut_resume(cfg, layout, resume, st, fold, last) if resume is not None else None
    core = build_network(cfg, fold, fd, rt, resume, last, first_fold)
    trainer, eval_model = make_trainer(cfg, rt, core, layout, resume, None if recut is None else recut[0])
    if recut is not None:
        rt.log(recut[1])
    elif resume is not None:
        where = f"after epoch {st.epoch}" + (f", {st.progress.step} batches into epoch {st.epoch + 1}"
                                             if st.progress.step else "")
        rt.log(f"fold {fold}: resuming {where} (best so far {st.best_loss:.4f} at epoch {st.best_epoch})")
    fw = watch.start_fold(fold, st.epoch) if watch is not None else None

    sampler = EpochSampler(env)
    loader = train_loader(train_ds, sampler, cfg, device)
    predict_kwargs = dict(batch_size=cfg.eval_batch, device=device, amp=rt.amp, channels_last=rt.channels_last,
                          tta=cfg.tta, workers=cfg.workers)
    val_loader = eval_loader(val_ds, shard(np.arange(len(val_ds)), env), batch_size=cfg.eval_batch, device=device,
                             workers=cfg.workers, persistent=True, prefetch=cfg.prefetch)
    clock = CheckpointClock(cfg.checkpoint_minutes, env, device)

    def checkpoint_now(progress: EpochProgress) -> None:
        if clock.due():
            rngs = gather_objects(rng_state(device), env)
            if env.is_main:
                save_resume(last, previous, cfg, core, fold, trainer, st, rngs, layout)
            clock.reset()

    while st.epoch < cfg.epochs and (cfg.select == "last" or st.bad_epochs < cfg.patience):
        number = st.epoch + 1  # epochs are numbered from 1 in files and logs
        seed = stage_seed(cfg, fold, number)
        batches = epoch_micro_batches(len(fd.train_ids), cfg.batch_size, env.world_size, cfg.accumulate, seed,
                                      cfg.epoch_fraction)
        if st.progress.step and recut is None:  # resumed inside this epoch: the random state of that moment
            restore_rng(resume["rng"][env.rank] if resume and resume.get("rng") else None, device)
        else:
            seed_everything(seed + env.rank)
        sampler.set_epoch(batches, seed, st.progress.step)
        clock.reset()
        if fw is not None:
            fw.epoch_begins(resumed_inside=st.progress.step > 0)
        result = train_one_epoch(trainer, loader, batches, st.progress, checkpoint_now,
                                 desc=f"{cfg.name} fold {fold} epoch {number}/{cfg.epochs}", watch=fw)
        val_pred = predict_sharded(judged_model(trainer, eval_model), val_ds, env, loader=val_loader,
                                   **{**predict_kwargs, "tta": cfg.val_tta})
        val_loss = weighted_log_loss(y_val, val_pred)
        row = record_epoch(cfg, rt, folder, fold, core, trainer, st, result, val_loss, layout,
                           fw.epoch_done(number) if fw is not None else "")
        if fw is not None:
            fw.epoch_scalars(row, result.data_wait_share)
        barrier(env)
        if on_epoch_end is not None:
            on_epoch_end(fold, st.epoch, row)
    barrier(env)
    del loader, val_loader  # the persistent workers go
    summary = finish_fold(cfg, fd, inputs, folder, rt, core, eval_model, y_val, val_ids, st, predict_kwargs)
    summary["seconds"] = time.perf_counter() - t_fold
    if env.is_main:
        write_json(folder.fold_done(fold), summary)  # last: marks the fold finished
        last.unlink(missing_ok=True)  # optimiser state is no longer needed
        previous.unlink(missing_ok=True)
    barrier(env)
    metrics = summary["metrics"]
    rt.log(f"fold {fold}: best epoch {summary['best_epoch']}/{cfg.epochs}  OOF weighted log loss "
           f"{metrics['weighted_log_loss']:.4f} (constant prior {summary['prior_weighted_log_loss']:.4f})  "
           f"{len(fd.train_ids)} train / {len(fd.val_ids)} val / {len(inputs.test_ids)} test images  "
           f"{summary['seconds']:.1f} s")
    return summary


def predict_split(cfg: TrainConfig, rt: Runtime, inputs: RunInputs, eval_model: torch.nn.Module, core: torch.nn.Module,
                  ids: list[str], readable: np.ndarray, prior: Sequence[float], embeddings_path: Path | None,
                  predict_kwargs: dict) -> np.ndarray:
    """Probabilities of ``ids`` by the fold's best model, and their embeddings into
    ``embeddings_path`` (float16 .npy, row i = ids[i]). An unreadable image gets the fold's
    training prior and a zero embedding."""
    env = rt.env
    with warnings.catch_warnings():  # the dataset's "served as air" note: said below, in our words
        warnings.simplefilter("ignore")
        dataset = inputs.datasets(ids, labeled=False, augment=False)
    embeddings = partial = width = None
    if embeddings_path is not None:
        width = embedding_width(core, n_channels(cfg.combination), cfg.img_size, rt.device)
        partial = embeddings_path.with_name(f".{embeddings_path.name}.tmp-shared")
        if env.is_main:  # only rank 0 opens the file: the other ranks send their rows to it
            partial.parent.mkdir(parents=True, exist_ok=True)
            embeddings = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(ids), width))
    probs = predict_sharded(eval_model, dataset, env, embeddings=embeddings, embedding_dim=width, **predict_kwargs)
    probs[~readable] = np.asarray(prior, dtype=np.float64)
    if embeddings is not None:
        embeddings[np.flatnonzero(~readable)] = 0
        embeddings.flush()
        del embeddings
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, embeddings_path)
    barrier(env)
    return probs


def epoch_choice(cfg: TrainConfig, history: list[dict], n_scored: int) -> dict[str, Any]:
    """How much choosing the best epoch on the fold flatters its OOF: the per-epoch validation loss
    (the fold's OOF rows, ``val_tta``) of the best and of the last epoch, beside the rule used."""
    losses = [float(row["val_weighted_log_loss"]) for row in history]
    if not losses:
        return {"select": cfg.select}
    best = int(np.argmin(losses))
    return {"select": cfg.select, "n_val_scored": n_scored,
            "best_epoch_val_loss": losses[best], "best_epoch_by_val": best + 1,
            "last_epoch_val_loss": losses[-1], "last_epoch": len(losses)}


def finish_fold(cfg: TrainConfig, fd: FoldData, inputs: RunInputs, folder: ModelFolder, rt: Runtime,
                core: torch.nn.Module, eval_model: torch.nn.Module, y_val: np.ndarray, val_ids: list[str],
                st: FoldState, predict_kwargs: dict) -> dict[str, Any]:
    """The fold's predictions from its best checkpoint, whatever epoch training stopped at: OOF and
    test probabilities (and embeddings) written; returns the fold's summary."""
    env, fold = rt.env, fd.fold
    best_state = load_checkpoint(folder.best(fold))
    load_weights(core, best_state, cfg, folder.best(fold))
    emb = (lambda split: folder.embeddings(fold, split)) if cfg.save_embeddings else (lambda split: None)
    oof = predict_split(cfg, rt, inputs, eval_model, core, fd.val_ids, fd.val_readable, fd.prior_rates, emb("oof"),
                        predict_kwargs)
    test = predict_split(cfg, rt, inputs, eval_model, core, inputs.test_ids, fd.test_readable, fd.prior_rates,
                         emb("test"), predict_kwargs)
    for what, ids, ok in (("validation", fd.val_ids, fd.val_readable), ("test", inputs.test_ids, fd.test_readable)):
        if not ok.all():
            bad = [i for i, good in zip(ids, ok) if not good]
            rt.log(f"fold {fold}: {len(bad)} unreadable {what} images (first: {bad[0]}; see bad_files.csv) get the "
                   f"fold's training label rates as their prediction")
    readable_oof = oof[fd.val_readable]
    all_train = inputs.folds.loc[inputs.folds["fold"] != fold, "image_id"]
    summary = {
        "fold": fold,
        "n_train": len(fd.train_ids),
        "n_val": len(fd.val_ids),
        "n_val_unreadable": int((~fd.val_readable).sum()),
        "n_test": len(inputs.test_ids),
        "n_test_unreadable": int((~fd.test_readable).sum()),
        "best_epoch": int(best_state["epoch"]),  # the kept epoch: the last one with select=last
        "epochs_run": len(st.history),
        **epoch_choice(cfg, st.history, len(y_val)),
        "stopped_early": len(st.history) < cfg.epochs,
        "metrics": score(y_val, readable_oof),
        "prior_weighted_log_loss": prior_score(inputs.label_array(all_train), y_val),
        "prior_rates": fd.prior_rates,
        "world_size": env.world_size,
        "embeddings": bool(cfg.save_embeddings),
        "config": cfg.to_dict(),
    }
    if env.is_main:
        oof_frame = pd.DataFrame(oof, columns=list(LABELS))
        oof_frame.insert(0, "fold", np.int64(fold))
        oof_frame.insert(0, "image_id", fd.val_ids)
        write_parquet(folder.fold_oof(fold), oof_frame)
        test_frame = pd.DataFrame(test, columns=list(LABELS))
        test_frame.insert(0, "image_id", inputs.test_ids)
        write_parquet(folder.fold_test(fold), test_frame)
    return summary


def run_oof(
    cfg: TrainConfig,
    inputs: RunInputs,
    model_dir: Path,
    rt: Runtime,
    on_epoch_end: EpochCallback | None = None,
    locks: ModelLocks | None = None,
    on_complete: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Train the requested folds and assemble the model folder; returns the metrics on rank 0.

    With ``locks`` (``run_model`` passes the work folder's) each fold is trained holding its own
    lock, and a fold another run holds is skipped (see ``fold_locks``); the shared files are written
    under the model's short lock, and ``on_complete`` (the finished stamp) is called under it too
    once every fold is done."""
    folder = ModelFolder(Path(model_dir))
    locks = locks or ModelLocks(None, cfg.name)
    all_folds = inputs.fold_numbers
    todo = list(cfg.folds) if cfg.folds is not None else all_folds
    unknown = sorted(set(todo) - set(all_folds))
    if unknown:
        raise ConfigError(f"folds {unknown} are not in the folds table (it has folds {all_folds})")
    # Every process checks (a failure on rank 0 alone would leave the others waiting at the barrier).
    watch = RunWatch.for_run(cfg, rt, folder.root, [k for k in todo if not folder.fold_done(k).is_file()])
    check_same_model(folder, cfg)
    weights = find_weights(cfg)
    if rt.env.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        with locks.shared():  # a run on another fold may be writing config.json or assembling
            check_same_model(folder, cfg)  # again: that run may have written config.json just now
            remove_shared_temporaries(folder)
            # Runs on other folds write the same identity (checked above); the rest is the latest run's.
            write_json(folder.config, {**cfg.to_dict(), "runtime": {
                "world_size": rt.env.world_size, "torch": torch.__version__, "timm": _timm_version(),
                "pretrained_weights": str(weights) if weights else None, "n_folds": len(all_folds),
                "global_batch": cfg.global_batch(rt.env.world_size),
                "lr_effective": cfg.lr * cfg.lr_factor(rt.env.world_size),
                # The image cache the images came from (prediction preprocesses new slices the same way).
                "cache_size": getattr(getattr(inputs.datasets, "cache", None), "size", None),
            }})
    barrier(rt.env)
    rt.log(cfg.lr_note(rt.env.world_size))
    held: list[LockHeldError] = []
    skipped = 0
    try:
        for fold in todo:
            with contextlib.ExitStack() as stack:
                error = None
                if rt.env.is_main:
                    try:
                        stack.enter_context(locks.fold(fold))
                    except LockHeldError as exc:
                        error = exc
                # Rank 0 holds the lock for the whole job: every rank skips, or trains, together.
                if all_reduce_sum([float(error is not None)], rt.env, rt.device)[0] > 0:
                    skipped += 1
                    if error is not None:
                        held.append(error)
                        rt.log(holder_line(fold, error))
                    continue
                if rt.env.is_main:
                    remove_fold_temporaries(folder, fold)
                train_fold(cfg, fold, inputs, folder, rt, on_epoch_end, watch)
    finally:
        watch.close()
    if todo and skipped == len(todo):  # nothing of ours to train: another run trains (and assembles) them all
        raise held[0] if held else LockHeldError(f"rank {rt.env.rank}: other runs hold every fold asked for")
    metrics = None
    if rt.env.is_main:
        with locks.shared():
            metrics = assemble(cfg, inputs, folder)
            if metrics["complete"] and on_complete is not None:
                on_complete()  # a rerun with nothing changed skips all of this
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
    check_tracker(cfg.tracker)  # a tracker that is not installed stops the run before the data is read
    paths = WorkPaths.for_data(data_dir, work_dir)
    inputs = load_inputs(data_dir, paths, cfg.combination, cfg.img_size, model=cfg.name, augment_config=cfg.aug)
    note = getattr(inputs.datasets, "note", None)
    if note:  # reading a larger cache: say once what it costs and how to build the exact one
        rt.log(note)
    return run_oof(cfg, inputs, paths.model_dir(name), rt, on_epoch_end, locks=ModelLocks(paths.root, name),
                   on_complete=lambda: mark_assembled(cfg, data_dir, work_dir))

