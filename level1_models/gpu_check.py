"""``make gpu-check``: is this GPU machine ready for the real run? One command, no dataset needed.

On a CUDA machine it writes a small synthetic competition (or reuses one), prepares it and builds
its 256 px cache, then trains resnet50 and efficientnet_b0 at 256 px, bf16 and channels-last, for
a few hundred steps, fed once from random tensors on the GPU (the ceiling) and once from the real
loader (cache reads, windows, augmentations in worker processes). It prints images/s of each, the
loader's share of the random-tensor rate and the share of time spent waiting for data; the target
is the loader within 20% of random tensors. With two or more GPUs it also trains one short fold
under torchrun (DDP over NCCL). On a machine without a CUDA GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("resnet50", "efficientnet_b0")


def _run(args: list[str]) -> None:
    print("+ " + " ".join(args), flush=True)
    subprocess.run(args, check=True)


def prepare_dataset(root: Path, patients: int, workers: int) -> tuple[Path, Path]:
    """A synthetic competition with its tables and 256 px cache (each step reuses what exists)."""
    data, work = root / "data", root / "work"
    py = sys.executable
    _run([py, "-m", "competition.synthetic", "generate", "--out", str(data), "--preset", "demo",
          "--patients", str(patients), "--workers", str(workers), "--quiet"])
    _run([py, "-m", "competition", "prepare", "--data", str(data), "--work", str(work), "--workers", str(workers)])
    _run([py, "-m", "features", "cache", "--data", str(data), "--work", str(work), "--size", "256",
          "--workers", str(workers)])
    return data, work


def bench_models(data: Path, work: Path, batch: int, steps: int, workers: int | None, compile_: bool) -> None:
    from competition.paths import WorkPaths
    from level1_models.bench import print_bench, run_bench
    from level1_models.config import build_config
    from level1_models.data import load_inputs
    from level1_models.train import setup_runtime

    for name in MODELS:
        overrides = {"img_size": 256, "batch_size": batch, "amp": "bf16", "channels_last": True, "compile": compile_}
        if workers is not None:
            overrides["workers"] = workers
        cfg, rt = setup_runtime(build_config(name, overrides))
        inputs = load_inputs(data, WorkPaths.for_data(data, work), cfg.combination, cfg.img_size, augment_config=cfg.aug)
        figures = run_bench(cfg, rt, inputs, steps=steps, warmup=max(10, steps // 10))
        print_bench(cfg, rt, figures)
        for what in ("train", "infer"):
            share = 100.0 * figures[f"{what}_data_loader"] / figures[f"{what}_random_tensors"]
            verdict = "ok" if share >= 80.0 else "BELOW the 80% target"
            print(f"{name}_{what}_loader_share: {share:.1f} % ({verdict})", flush=True)


def ddp_check(data: Path, work: Path, gpus: int) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    _run([str(torchrun), "--standalone", f"--nproc_per_node={gpus}", "-m", "level1_models", "oof",
          "--model", "resnet50", "--data", str(data), "--work", str(work / "ddp"), "--folds", "0",
          "--epochs", "1", "--img-size", "256", "--batch", "64", "--set", "pretrained=false"])
    print(f"ddp_check: ok ({gpus} GPUs, one fold of resnet50)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m level1_models.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=None,
                   help="where the synthetic competition goes (default: a temporary folder, removed after)")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--batch", type=int, default=128, help="batch per GPU")
    p.add_argument("--steps", type=int, default=200, help="timed steps per figure")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores / GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models too")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA GPU on this machine; nothing to check (run it where the GPUs are)")
        return 0
    gpus = torch.cuda.device_count()
    print(f"gpu-check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = args.dir or Path(tmp)
        data, work = prepare_dataset(root, args.patients, os.cpu_count() or 1)
        bench_models(data, work, args.batch, args.steps, args.workers, args.compile)
        if gpus >= 2:
            ddp_check(data, work, gpus)
    return 0


if __name__ == "__main__":
    from competition.cli import run_main

    sys.exit(run_main(main, prog="level1_models.gpu_check"))
