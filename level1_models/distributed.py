"""Data-parallel training under ``torchrun``: one process per GPU (or CPU process with gloo).

The global batch is the spec's batch size whatever the number of processes: each step takes the
next ``batch_size`` indices of one shared, seeded permutation and process ``r`` of ``W`` gets every
W-th of them. Each process scales its summed loss by ``W / global batch`` so that DDP's gradient
average equals the single-process mean gradient. With batch-independent normalisation (or
SyncBatchNorm on GPUs) a run on N processes matches a single process up to floating-point noise.
Only rank 0 writes files.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a plain run is rank 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); no-op for one process."""
    env = env_from_torchrun()
    if env.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return env


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shard(indices: np.ndarray, env: DistEnv) -> np.ndarray:
    """This process's share of ``indices`` (every world_size-th, starting at its rank)."""
    return indices[env.rank :: env.world_size]


def gather_predictions(local_index: np.ndarray, local_pred: np.ndarray, n: int, env: DistEnv) -> np.ndarray:
    """Reassemble per-process predictions (rows ``local_index``) into one (n, k) array on every rank."""
    if not env.enabled:
        return local_pred
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, (local_index, local_pred))
    out = np.empty((n, local_pred.shape[1]), dtype=local_pred.dtype)
    seen = np.zeros(n, dtype=bool)
    for index, pred in parts:
        out[index] = pred
        seen[index] = True
    if not seen.all():
        raise RuntimeError(f"distributed prediction lost {int((~seen).sum())} of {n} rows")
    return out


def gather_rows_to_main(local_index: np.ndarray, local_rows: np.ndarray, out: np.ndarray | None, env: DistEnv,
                        chunk: int = 8192) -> None:
    """Rank 0 receives every process's rows into ``out`` (row ``local_index[i]`` = ``local_rows[i]``),
    ``chunk`` rows per process at a time through the process group: no file is shared between
    processes, so ranks on other hosts need no common file system, and memory stays bounded."""
    if not env.enabled:
        if out is not None:
            out[local_index] = local_rows
        return
    counts = gather_objects(len(local_index), env)
    for start in range(0, max(counts), chunk):
        part = (local_index[start : start + chunk], local_rows[start : start + chunk])
        parts: list[Any] | None = [None] * env.world_size if env.is_main else None
        dist.gather_object(part, parts, dst=0)
        if env.is_main and out is not None and parts is not None:
            for index, rows in parts:
                out[index] = rows


def all_reduce_sum(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    if not env.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not env.enabled:
        return [obj]
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, obj)
    return parts
