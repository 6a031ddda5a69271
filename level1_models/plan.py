"""``make plan MODELS="a b c" GPUS=N``: what a level-1 run costs, before it starts.

Per model and in total: the image cache it reads (``level1_models.caches``: its own size, or a
larger one it shares) and that cache's size on disk, training images
per epoch, forward FLOPs per image, an estimate of training images/s, GPU-hours per fold and for
all folds, the embeddings it writes, and the wall time on N GPUs. Nothing is trained, downloaded
or written (``--json PATH`` writes the table as JSON).

FLOPs: one forward of the spec's network without weights, built on the meta device (no memory,
no arithmetic), on one image of the spec's size and channels, counted by
``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add of the convolutions and
matrix products (norms, activations and pooling are not counted). A training step is taken as
3 forwards (forward + backward).

Throughput: ``make gpu-check`` measured training and inference images/s of two references, fed
by the real loader (``gpu_throughput.json``: date, GPU, settings). A spec's rate is its
reference's rate x the reference's FLOPs per image / the spec's (the reference counted the same
way at the measured size): efficientnet_b0 for the depthwise-convolution families (efficientnet,
mobilenet: memory-bound, so FLOPs understate their time), resnet50 for every other net. This is
rough, +-2x; more where the batch is far from the measured 128 (small batches use a GPU less well).
No estimate exceeds the fastest rate measured from the real loader (nothing faster was seen: a
small net would wait for its data), so the tiny nets are capped rather than priced by their FLOPs.

Time per fold: epochs x (the images an epoch draws / training rate + the fold's validation images
x ``val_tta`` views / inference rate), then the OOF and test prediction with the best checkpoint
(x ``tta`` views; hflip = 2), as ``level1_models.train`` runs them. An epoch draws ``epoch_fraction``
of the fold's training images (after ``limit``). Every epoch is counted (early stopping can only
shorten a run); an EMA of the weights adds no forward pass and is not counted.

Wall time: every fold is an independent job on one GPU (``make oof MODEL=m FOLDS=k`` on each);
N GPUs take the jobs of all models longest first, each onto the GPU that is free soonest.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.windows import n_channels
from level1_models.caches import cache_bytes, needed_cache_sizes
from level1_models.config import TrainConfig, build_config

# The README's recommended real-data set; `make plan` without MODELS prices these.
RECOMMENDED = ("rsna1st_densenet121", "rsna1st_seresnext101", "rsna2nd_resnext101_wsl", "rsna3rd_seresnext50",
               "rsna11th_seresnext50")  # the 2019 winners' level-1 recipes
TRAIN_IMAGES = 752_803  # stage_2_train.csv: the competition's training slices
TEST_IMAGES = 121_232  # stage_2_sample_submission.csv: its test slices
N_FOLDS = 5
TRAIN_FORWARDS = 3  # a training step ~ forward + backward (twice a forward)
EMBEDDING_BYTES = 2  # float16
DEPTHWISE_FAMILIES = ("efficientnet", "mobilenet")  # priced from efficientnet_b0, the rest from resnet50
CALIBRATION_FILE = Path(__file__).with_name("gpu_throughput.json")
GB = 1e9


@dataclass(frozen=True)
class Counts:
    train_images: int = TRAIN_IMAGES
    test_images: int = TEST_IMAGES
    n_folds: int = N_FOLDS

    def __post_init__(self) -> None:
        if self.n_folds < 2:
            raise ValueError(f"plan: N_FOLDS must be >= 2, got {self.n_folds}")
        if self.train_images < self.n_folds or self.test_images < 0:
            raise ValueError(f"plan: need at least one training image per fold and no negative counts "
                             f"(train {self.train_images}, test {self.test_images}, folds {self.n_folds})")


@dataclass(frozen=True)
class Calibration:
    """Images/s measured by ``make gpu-check`` on one GPU (``gpu_throughput.json``)."""

    date: str
    gpu: str
    setup: str
    img_size: int
    batch: int
    references: Mapping[str, Mapping[str, float]]  # spec name -> train_loader, infer_loader, ...

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> "Calibration":
        raw = json.loads(Path(path).read_text())
        return cls(date=raw["date"], gpu=raw["gpu"], setup=raw["setup"], img_size=int(raw["img_size"]),
                   batch=int(raw["batch"]), references=raw["references"])

    def reference_config(self, name: str) -> TrainConfig:
        """The reference spec as it was measured (its own windows, the measured size)."""
        return build_config(name, {"img_size": self.img_size, "pretrained": False})


@dataclass(frozen=True)
class NetCount:
    flops: int  # one forward of one image
    width: int  # pooled features (the embedding) per image


def count_network(cfg: TrainConfig) -> NetCount:
    """Forward FLOPs per image and embedding width of ``cfg``'s network (no weights, meta device)."""
    import torch  # here: the plan's constants and arithmetic need no torch
    from torch.utils.flop_counter import FlopCounterMode

    from level1_models.modeling import create_network
    from level1_models.predict import embedding_width

    meta = torch.device("meta")
    with meta:
        model = create_network(cfg).eval()
    channels = n_channels(cfg.combination)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, channels, cfg.img_size, cfg.img_size, device=meta))
    return NetCount(flops=int(counter.get_total_flops()), width=embedding_width(model, channels, cfg.img_size, meta))


def reference_for(arch: str) -> str:
    return "efficientnet_b0" if any(f in arch.lower() for f in DEPTHWISE_FAMILIES) else "resnet50"


def _views(tta: str) -> int:
    return 2 if tta == "hflip" else 1


def fold_seconds(train_images: int, val_images: int, test_images: int, epochs: int, val_views: int, views: int,
                 train_rate: float, infer_rate: float) -> float:
    """One fold on one GPU: every epoch trains and validates; then OOF + test with the best model."""
    per_epoch = train_images / train_rate + val_images * val_views / infer_rate
    return epochs * per_epoch + (val_images + test_images) * views / infer_rate


def embedding_bytes(width: int, counts: Counts) -> int:
    """OOF embeddings (each training image once) + test embeddings (every fold writes all)."""
    return EMBEDDING_BYTES * width * (counts.train_images + counts.test_images * counts.n_folds)


def wall_hours(jobs: Iterable[float], gpus: int) -> float:
    """Longest first, each job onto the GPU free soonest: when the last one ends."""
    free = [0.0] * max(1, gpus)
    for hours in sorted(jobs, reverse=True):
        heapq.heapreplace(free, free[0] + hours)
    return max(free)


@dataclass(frozen=True)
class Row:
    name: str
    arch: str
    img_size: int
    channels: int
    batch: int
    epochs: int
    val_tta: str
    tta: str
    cache_size: int
    cache_bytes: int
    images_per_epoch: int
    gflops: float  # forward, per image
    reference: str
    capped: bool  # the FLOP scaling was faster than any loader rate measured: held at that rate
    train_rate: float  # estimated images/s on one GPU
    infer_rate: float
    fold_hours: float
    hours: float  # every fold
    embedding_bytes: int
    wall_hours: float  # this model's folds alone on the plan's GPUs


@dataclass(frozen=True)
class Plan:
    rows: list[Row]
    caches: dict[int, int]  # size -> bytes
    hours: float
    embedding_bytes: int
    wall_hours: float
    gpus: int
    counts: Counts
    calibration: Calibration

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [dataclasses.asdict(r) for r in self.rows],
                "totals": {"caches": {str(k): v for k, v in self.caches.items()},
                           "cache_bytes": sum(self.caches.values()), "gpu_hours": self.hours,
                           "embedding_bytes": self.embedding_bytes, "wall_hours": self.wall_hours},
                "gpus": self.gpus, "counts": dataclasses.asdict(self.counts),
                "calibration": dataclasses.asdict(self.calibration)}


def make_plan(names: Sequence[str], overrides: Mapping[str, Any] | None = None, counts: Counts = Counts(),
              gpus: int = 1, calibration: Calibration | None = None) -> Plan:
    if gpus < 1:
        raise ValueError(f"plan: GPUS must be >= 1, got {gpus}")
    calibration = calibration or Calibration.load()
    # Every name and override is checked before any network is built.
    cfgs = [build_config(name, {**(overrides or {}), "pretrained": False}) for name in names]
    ref_flops = {ref: count_network(calibration.reference_config(ref)).flops for ref in calibration.references}
    slices = counts.train_images + counts.test_images
    # IMG_SIZE= puts every model at one size: they all read that one cache.
    needed = ({cfgs[0].img_size: list(names)} if overrides and "img_size" in overrides
              else needed_cache_sizes(names))
    caches = {size: cache_bytes(size, slices) for size in sorted(needed)}
    reads = {name: size for size, readers in needed.items() for name in readers}
    val_images = round(counts.train_images / counts.n_folds)
    ceiling = {k: max(m[k] for m in calibration.references.values()) for k in ("train_loader", "infer_loader")}
    rows, jobs = [], []
    for cfg in cfgs:
        net = count_network(cfg)
        ref = reference_for(cfg.arch)
        measured = calibration.references[ref]
        scale = ref_flops[ref] / net.flops
        train_rate, infer_rate = measured["train_loader"] * scale, measured["infer_loader"] * scale
        capped = train_rate > ceiling["train_loader"] or infer_rate > ceiling["infer_loader"]
        train_rate, infer_rate = min(train_rate, ceiling["train_loader"]), min(infer_rate, ceiling["infer_loader"])
        fold_train = counts.train_images - val_images
        if cfg.limit is not None:
            fold_train = min(fold_train, cfg.limit)
        per_epoch = round(fold_train * cfg.epoch_fraction)
        fold_h = fold_seconds(per_epoch, val_images, counts.test_images, cfg.epochs, _views(cfg.val_tta),
                              _views(cfg.tta), train_rate, infer_rate) / 3600
        model_jobs = [fold_h] * counts.n_folds
        jobs += model_jobs
        cache = reads[cfg.name]
        rows.append(Row(name=cfg.name, arch=cfg.arch, img_size=cfg.img_size, channels=n_channels(cfg.combination),
                        batch=cfg.batch_size, epochs=cfg.epochs, val_tta=cfg.val_tta, tta=cfg.tta, cache_size=cache,
                        cache_bytes=caches[cache], images_per_epoch=per_epoch, gflops=net.flops / 1e9,
                        reference=ref, capped=capped, train_rate=train_rate, infer_rate=infer_rate, fold_hours=fold_h,
                        hours=fold_h * counts.n_folds,
                        embedding_bytes=embedding_bytes(net.width, counts) if cfg.save_embeddings else 0,
                        wall_hours=wall_hours(model_jobs, gpus)))
    return Plan(rows=rows, caches=caches, hours=sum(r.hours for r in rows),
                embedding_bytes=sum(r.embedding_bytes for r in rows), wall_hours=wall_hours(jobs, gpus),
                gpus=gpus, counts=counts, calibration=calibration)


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h < 48 else f"{h:.0f} h ({h / 24:.1f} d)"


def format_plan(plan: Plan) -> str:
    """The table, then the caches and the assumptions in a few lines."""
    header = ("model", "arch", "px", "ch", "batch", "ep", "TTA", "cache", "img/epoch", "GFLOP/img", "train img/s",
              "from", "GPU-h/fold", "GPU-h", "embeddings", f"wall, {plan.gpus} GPU{'s' * (plan.gpus > 1)}")
    lines = [[r.name, r.arch, str(r.img_size), str(r.channels), str(r.batch), str(r.epochs), f"{r.val_tta}/{r.tta}",
              f"{r.cache_size} px", f"{r.images_per_epoch:,}", f"{r.gflops:.2f}", f"{r.train_rate:,.0f}",
              r.reference + " (cap)" * r.capped, f"{r.fold_hours:.2f}", f"{r.hours:.1f}", f"{r.embedding_bytes / GB:.1f} GB",
              _hours(r.wall_hours)] for r in plan.rows]
    cache_total = sum(plan.caches.values())
    lines.append([f"total ({len(plan.rows)})", "", "", "", "", "", "", f"{cache_total / GB:.0f} GB", "", "", "", "", "",
                  f"{plan.hours:.1f}", f"{plan.embedding_bytes / GB:.1f} GB", _hours(plan.wall_hours)])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    left = {0, 1, 6, 11}  # text columns; numbers align right

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(fmt(header))
    c, cal = plan.counts, plan.calibration
    caches = ", ".join(f"{size} px {n / GB:.0f} GB" for size, n in plan.caches.items())
    notes = [
        f"Caches: {caches} ({c.train_images + c.test_images:,} slices). Embeddings: float16, OOF + every fold's test.",
        f"Counts: {c.train_images:,} train images in {c.n_folds} folds (a fold trains on {c.n_folds - 1}/{c.n_folds} "
        f"and validates on 1/{c.n_folds} every epoch), {c.test_images:,} test images; every epoch counted (early "
        f"stopping only shortens a run). TTA: of the validation after each epoch / of the final OOF and test "
        f"prediction (hflip = 2 forwards per image).",
        f"FLOPs: torch FlopCounterMode, one forward at batch 1, 2 FLOPs per multiply-add; training ~ "
        f"{TRAIN_FORWARDS} x forward.",
        f"train img/s per GPU: estimate from the reference in 'from' measured by make gpu-check {cal.date} on "
        f"{cal.gpu} ({cal.setup}), scaled by FLOPs per image: rough, +-2x, worse at batches far from {cal.batch}."
        + (" (cap): held at the fastest rate measured from the real loader." if any(r.capped for r in plan.rows) else ""),
        f"Wall: each fold is an independent one-GPU job (make oof MODEL=m FOLDS=k); {plan.gpus} GPU(s) take the "
        f"jobs longest first.",
    ]
    wrapped = [textwrap.fill(n, width=max(100, len(rule)), subsequent_indent="  ") for n in notes]
    return "\n".join([fmt(header), rule, *(fmt(x) for x in lines[:-1]), rule, fmt(lines[-1]), "", *wrapped])


def split_names(text: str | None) -> list[str]:
    """``"a b,c"`` -> ``["a", "b", "c"]``; None or blank -> the recommended set."""
    names = [n for n in re.split(r"[,\s]+", text or "") if n]
    return list(dict.fromkeys(names)) or list(RECOMMENDED)


def counts_from_work(data: Path, work: Path | None) -> Counts:
    """Train and test images and folds from a prepared work folder (``make prepare``)."""
    import pandas as pd

    from competition.paths import WorkPaths

    paths = WorkPaths.for_data(data, work)
    for table in (paths.folds, paths.metadata):
        if not table.is_file():
            raise FileNotFoundError(f"plan: {table} not found: run make prepare DATA={data} first, "
                                    f"or leave DATA out to plan for the real competition's counts")
    folds = pd.read_parquet(paths.folds, columns=["fold"])
    split = pd.read_parquet(paths.metadata, columns=["split"])["split"]
    return Counts(train_images=len(folds), test_images=int((split == "test").sum()),
                  n_folds=int(folds["fold"].nunique()))


def resolve_counts(args: argparse.Namespace) -> Counts:
    if args.data is not None:
        counts = counts_from_work(args.data, args.work)
        if args.n_folds is not None and args.n_folds != counts.n_folds:
            raise ValueError(f"plan: {args.data} was prepared with {counts.n_folds} folds, not N_FOLDS={args.n_folds}")
        return counts
    return Counts(train_images=args.train_images, test_images=args.test_images, n_folds=args.n_folds or N_FOLDS)
