"""``make oof MODEL=m GPUS=N SPREAD=folds``: one fold per device at once, no communication.

Runs ``python -m level1_models oof --folds k`` once per unfinished fold, at most N at a time, each
pinned to one device with ``CUDA_VISIBLE_DEVICES=i`` and given its share of the machine's loader
workers (cores // N, unless ``--workers`` says otherwise). Each job holds its fold's lock and
assembles the model at its end under the model's short lock, so the job that finishes the last
fold writes ``oof.parquet`` / ``test.parquet`` (``fold_locks.py``). On a CPU machine the "devices"
are just N processes (``--device cpu``), which is how the tests run it.

Each job's output goes to ``<work>/logs/oof-<model>-fold<k>.log``; a failed job is named, with its
log, in one line once the others have finished (their folds are kept).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from competition.failures import FixableError
from competition.paths import WorkPaths
from level1_models.config import TrainConfig, available_cores
from level1_models.folder import ModelFolder

# Options passed on to every job as they were given (the launcher sets --folds and --workers).
PASSED = {"work": "--work", "epochs": "--epochs", "img_size": "--img-size", "batch": "--batch",
          "limit": "--limit", "device": "--device"}


class SpreadError(FixableError):
    """A fold's job failed (or the launcher was asked something it cannot do)."""


def job_command(args: argparse.Namespace, fold: int, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "level1_models", "oof", "--model", args.model, "--data", str(args.data),
           "--folds", str(fold), "--workers", str(workers)]
    for option, flag in PASSED.items():
        value = getattr(args, option)
        if value is not None:
            cmd += [flag, str(value)]
    for item in args.sets:
        cmd += ["--set", item]
    return cmd


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return lines[-1].strip() if lines else "(empty log)"


def spread_folds(args: argparse.Namespace, cfg: TrainConfig, poll_s: float = 0.5) -> bool:
    """Train the unfinished folds of ``cfg.folds`` (default: all) as independent jobs. Returns False
    when there is nothing to train (the caller then checks / assembles the model in-process)."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise SpreadError("--spread folds starts its own processes; run it without torchrun (GPUS=N SPREAD=folds)")
    n = args.gpus
    if n is None or n < 1:
        raise SpreadError("--spread folds needs --gpus N (make oof ... GPUS=N SPREAD=folds), N >= 1")
    paths = WorkPaths.for_data(args.data, args.work)
    if not paths.folds.is_file():
        raise SpreadError(f"{paths.folds} is missing; run make prepare DATA={args.data} first")
    all_folds = sorted(int(k) for k in pd.read_parquet(paths.folds, columns=["fold"])["fold"].unique())
    wanted = list(cfg.folds) if cfg.folds is not None else all_folds
    unknown = sorted(set(wanted) - set(all_folds))
    if unknown:
        raise SpreadError(f"folds {unknown} are not in the folds table (it has folds {all_folds})")
    folder = ModelFolder(paths.model_dir(cfg.name))
    queue = [k for k in wanted if not folder.fold_done(k).is_file()]
    if not queue:
        return False
    workers = args.workers if args.workers is not None else max(1, available_cores() // n)
    logs = paths.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    free = list(range(min(n, len(queue))))
    running: dict[int, tuple[int, subprocess.Popen, Path]] = {}  # device -> (fold, process, log)
    failed: list[tuple[int, int, Path]] = []
    print(f"{cfg.name}: folds {queue} as independent jobs on {len(free)} devices, {workers} loader workers each; "
          f"logs in {logs}", flush=True)
    try:
        while queue or running:
            while queue and free:
                device, fold = free.pop(0), queue.pop(0)
                log = logs / f"oof-{cfg.name}-fold{fold}.log"
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(device)}
                for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
                    env.pop(name, None)
                with open(log, "w") as fh:
                    proc = subprocess.Popen(job_command(args, fold, workers), stdout=fh, stderr=subprocess.STDOUT,
                                            env=env)
                running[device] = (fold, proc, log)
                print(f"fold {fold}: started on device {device} (pid {proc.pid})", flush=True)
            time.sleep(poll_s)
            for device, (fold, proc, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[device]
                free.append(device)
                if code == 0:
                    print(f"fold {fold}: {_last_line(log)}", flush=True)
                else:
                    failed.append((fold, code, log))
                    print(f"fold {fold}: failed (exit {code}), see {log}", flush=True)
    except BaseException:
        for _, proc, _ in running.values():  # ours: stop them (their folds resume from last.pt)
            proc.terminate()
        for _, proc, _ in running.values():
            proc.wait()
        raise
    if failed:
        fold, code, log = failed[0]
        others = f" (and folds {[f for f, _, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise SpreadError(f"fold {fold}{others} failed (exit {code}): {_last_line(log)}; its log is {log}; "
                          f"the other folds are kept, run the same command to retry")
    return True
