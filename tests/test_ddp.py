"""Data-parallel training on CPU (gloo, 2 processes) gives what one process gives, up to
floating-point noise: same global batches, loss scaled so DDP's gradient average is the global
mean, predictions sharded and gathered, only rank 0 writing files."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from competition.constants import LABELS
from conftest import prepare_tiny_competition
from level1_models.config import build_config
from level1_models.data import RunInputs
from level1_models.distributed import shard
from level1_models.train import ModelFolder, run_oof, setup_runtime

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

# A LayerNorm model (no batch statistics) without augmentation, dropout or drop-path: nothing
# depends on how a global batch is split between processes.
OVERRIDES = dict(epochs=2, img_size=32, batch_size=8, lr_batch=8, workers=0, device="cpu", augment=False, lr=3e-3)
MODEL = "tiny_convnext"
# Two processes at batch 4 make the global batch of 8, the batch the lr is set for: both runs
# train at the same lr without touching it.
PER_PROCESS = {**OVERRIDES, "batch_size": 4}


class Squares(Dataset):
    """Label j shows as a bright square at place j; an image depends only on its id."""

    def __init__(self, image_ids, labels: np.ndarray, channels: int = 3, size: int = 32):
        self.ids, self.labels, self.channels, self.size = list(image_ids), labels, channels, size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        rng = np.random.default_rng(int(self.ids[i][3:], 16))
        x = rng.normal(0.3, 0.1, (self.channels, self.size, self.size)).astype(np.float32)
        for j in range(5):
            if self.labels[i, j]:
                r, c = divmod(j, 3)
                x[:, r * 8 + 2 : r * 8 + 8, c * 8 + 2 : c * 8 + 8] += 0.8
        return torch.from_numpy(x), torch.from_numpy(self.labels[i].astype(np.float32))


def make_inputs(n_train: int = 40, n_test: int = 10) -> RunInputs:
    ids = [f"ID_{i:09x}" for i in range(1, n_train + n_test + 1)]
    rng = np.random.default_rng(1)
    sub = (rng.random((len(ids), 5)) < 0.15).astype(np.int8)
    table = pd.DataFrame(np.concatenate([sub, sub.max(1, keepdims=True)], 1), columns=list(LABELS))
    table.insert(0, "image_id", ids)
    by_id = table.set_index("image_id")

    def datasets(image_ids, labeled, augment):
        return Squares(image_ids, by_id.loc[list(image_ids), list(LABELS)].to_numpy())

    labels = table.iloc[:n_train].reset_index(drop=True)
    folds = pd.DataFrame({"image_id": labels["image_id"], "fold": np.arange(n_train) % 2})
    return RunInputs(folds=folds, labels=labels, test_ids=ids[n_train:], datasets=datasets)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, errors) -> None:
    # What torchrun sets for each process.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        cfg, rt = setup_runtime(build_config(MODEL, PER_PROCESS))
        assert rt.env.world_size == world and rt.env.rank == rank and torch.distributed.get_backend() == "gloo"
        run_oof(cfg, make_inputs(), Path(out), rt)
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_shards_cover_every_row_once():
    from level1_models.distributed import DistEnv

    rows = np.arange(11)
    parts = [shard(rows, DistEnv(rank=r, world_size=3)) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == rows.tolist()


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg, rt = setup_runtime(build_config(MODEL, OVERRIDES))
    assert rt.env.world_size == 1
    single = tmp_path / "single"
    run_oof(cfg, make_inputs(), single, rt)

    # Forked workers inherit the imported modules (a spawned process would import torch again).
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    port, ddp = _free_port(), tmp_path / "ddp"
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(ddp), errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    messages = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert all(p.exitcode == 0 for p in procs), "\n".join(messages) or [p.exitcode for p in procs]

    one, two = ModelFolder(single), ModelFolder(ddp)
    a, b = pd.read_parquet(one.oof), pd.read_parquet(two.oof)
    assert a["image_id"].tolist() == b["image_id"].tolist()
    np.testing.assert_allclose(b[list(LABELS)].to_numpy(), a[list(LABELS)].to_numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pd.read_parquet(two.test)[list(LABELS)].to_numpy(),
                               pd.read_parquet(one.test)[list(LABELS)].to_numpy(), rtol=1e-4, atol=1e-6)
    for k in (0, 1):  # the embeddings, which rank 0 gathers through the process group, agree too
        for split in ("oof", "test"):
            e1, e2 = np.load(one.embeddings(k, split)), np.load(two.embeddings(k, split))
            assert e1.shape == e2.shape and e1.dtype == e2.dtype == np.float16 and np.abs(e1).max() > 0
            np.testing.assert_allclose(e2.astype(np.float32), e1.astype(np.float32), rtol=2e-3, atol=2e-3)
    for k in (0, 1):  # the training curves agree too (loss averaged over both processes' images)
        ca, cb = pd.read_csv(one.curves_csv(k)), pd.read_csv(two.curves_csv(k))
        np.testing.assert_allclose(cb["train_loss"], ca["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(cb["val_weighted_log_loss"], ca["val_weighted_log_loss"], rtol=1e-4)
    config = json.loads(two.config.read_text())
    assert config["runtime"]["world_size"] == 2 and config["runtime"]["global_batch"] == 8
    assert config["runtime"]["lr_effective"] == pytest.approx(OVERRIDES["lr"])
    assert not list(ddp.rglob(".*.tmp-*"))


def test_lr_grows_with_the_global_batch():
    adamw = build_config(MODEL, OVERRIDES)
    sgd = build_config("tiny_resnet", {**OVERRIDES, "optimizer": "sgd"})
    assert adamw.lr_factor(1) == 1.0 and adamw.lr_factor(4) == pytest.approx(2.0)  # sqrt, like timm
    assert sgd.lr_factor(4) == pytest.approx(4.0)  # linear (Goyal et al.)
    accumulating = build_config(MODEL, {**OVERRIDES, "accumulate": 2, "lr_scale": "linear"})
    assert accumulating.lr_factor(4) == pytest.approx(8.0)
    assert build_config(MODEL, {**OVERRIDES, "lr_scale": "none"}).lr_factor(8) == 1.0


def test_batch_follows_the_spec_lr_rule_and_says_so():
    """BATCH= (batch_size) moves lr by the spec's rule from the batch the spec's lr is for."""
    spec = build_config("resnet50")
    assert spec.lr_batch == spec.batch_size and spec.lr_factor(1) == 1.0
    smaller = build_config("resnet50", {"batch_size": spec.batch_size // 4})
    assert smaller.lr_batch == spec.batch_size  # the override does not move the reference batch
    assert smaller.lr_factor(1) == pytest.approx(0.5)  # sqrt(1/4): AdamW
    assert smaller.lr_factor(8) == pytest.approx(math.sqrt(2))  # 8 GPUs x batch/4 = 2 x the spec's batch
    sgd = build_config("vgg16", {"batch_size": 2 * build_config("vgg16").batch_size})
    assert sgd.lr_factor(1) == pytest.approx(2.0)  # linear for SGD
    note = smaller.lr_note(1)
    assert f"lr {spec.lr * 0.5:.3g} at global batch {spec.batch_size // 4}" in note
    assert f"the spec's {spec.lr:.3g} at batch {spec.batch_size}" in note and "sqrt rule" in note


def test_accumulation_matches_one_larger_batch(tmp_path, monkeypatch):
    """Batch 4 with two micro-batches per step = batch 8 (same images per step, same effective lr)."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg, rt = setup_runtime(build_config(MODEL, {**OVERRIDES, "epochs": 1}))
    run_oof(cfg, make_inputs(), tmp_path / "big", rt)
    cfg, rt = setup_runtime(build_config(MODEL, {**PER_PROCESS, "epochs": 1, "accumulate": 2}))
    run_oof(cfg, make_inputs(), tmp_path / "accumulated", rt)
    a, b = (pd.read_parquet(ModelFolder(tmp_path / n).oof) for n in ("big", "accumulated"))
    np.testing.assert_allclose(b[list(LABELS)].to_numpy(), a[list(LABELS)].to_numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_torchrun_cli_on_a_synthetic_competition(tmp_path):
    """`torchrun --nproc_per_node=2 -m level1_models oof` (what `make oof GPUS=2` runs) on CPU."""
    from level1_models.__main__ import main

    data, paths = prepare_tiny_competition(tmp_path)
    # BATCH is per process: 2 x 4 under torchrun is the global batch of 8 of the single run below
    # (lr_scale=none keeps both at the spec's lr).
    options = ["--model", MODEL, "--data", str(data), "--epochs", "1", "--img-size", "32", "--workers", "0",
               "--device", "cpu", "--set", "augment=false", "--set", "lr_scale=none"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "level1_models", "oof",
                          "--work", str(paths.root), *options, "--batch", "4"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("fold 0: best epoch") == 1  # only rank 0 reports
    single = tmp_path / "single"
    import shutil

    shutil.copytree(paths.root, single, ignore=shutil.ignore_patterns("models"))
    assert main(["oof", "--work", str(single), *options, "--batch", "8"]) == 0
    a = pd.read_parquet(ModelFolder(single / "models" / MODEL).oof)
    b = pd.read_parquet(ModelFolder(paths.model_dir(MODEL)).oof)
    assert a["image_id"].tolist() == b["image_id"].tolist()
    np.testing.assert_allclose(b[list(LABELS)].to_numpy(), a[list(LABELS)].to_numpy(), rtol=1e-4, atol=1e-6)


def _gather_worker(rank: int, port: int, results) -> None:
    from level1_models.distributed import DistEnv, gather_rows_to_main

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    env = DistEnv(rank=rank, world_size=2)
    rows = np.arange(11 * 4, dtype=np.float16).reshape(11, 4)
    mine = shard(np.arange(11), env)  # 6 and 5 rows: uneven, several chunks of 2
    out = np.zeros_like(rows) if rank == 0 else None
    gather_rows_to_main(mine, rows[mine], out, env, chunk=2)
    if rank == 0:
        results.put(out.tolist())
    torch.distributed.destroy_process_group()


def test_rank_zero_gathers_every_row_in_chunks():
    ctx = multiprocessing.get_context("fork")
    results, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert results.get(timeout=5) == np.arange(44, dtype=np.float16).reshape(11, 4).tolist()


@pytest.mark.slow
def test_two_nodes_rendezvous_through_make(tmp_path):
    """`make oof GPUS=1 NNODES=2 RDZV_ENDPOINT=...` run twice, as on two machines: torchrun's c10d
    rendezvous joins them into one world of 2 (gloo on CPU); the result equals one process at the
    global batch."""
    data, paths = prepare_tiny_competition(tmp_path)
    common = [f"DATA={data}", f"MODEL={MODEL}", "EPOCHS=1", "IMG_SIZE=32", "WORKERS=0", "DEVICE=cpu", "FOLDS=0",
              "SET=augment=false lr_scale=none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(["make", "--no-print-directory", "oof", *common, f"WORK={paths.root}", "GPUS=1", "BATCH=4",
                               "NNODES=2", f"RDZV_ENDPOINT={endpoint}", f"NODE_RANK={rank}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-2000:] for log in logs)
    assert sum(log.count("fold 0: best epoch") for log in logs) == 1  # one world: only its rank 0 reports
    config = json.loads(ModelFolder(paths.model_dir(MODEL)).config.read_text())
    assert config["runtime"]["world_size"] == 2
    single = tmp_path / "single"
    import shutil

    shutil.copytree(paths.root, single, ignore=shutil.ignore_patterns("models", ".locks"))
    run = subprocess.run(["make", "--no-print-directory", "oof", *common, f"WORK={single}", "BATCH=8"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    a = pd.read_parquet(ModelFolder(single / "models" / MODEL).fold_oof(0))
    b = pd.read_parquet(ModelFolder(paths.model_dir(MODEL)).fold_oof(0))
    assert a["image_id"].tolist() == b["image_id"].tolist()
    np.testing.assert_allclose(b[list(LABELS)].to_numpy(), a[list(LABELS)].to_numpy(), rtol=1e-4, atol=1e-6)
