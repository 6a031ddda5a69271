"""The registry of named level-1 model specs (timm's ``register_model`` habit, one level up).

A spec names a timm architecture *and* how it is trained here: the window combination it sees,
its input size, batch size, optimiser, schedule, epochs and augmentations (``aug``, a
``features.augment_config.AugmentConfig``). ``make oof MODEL=<name>`` looks a spec
up here; an unknown name fails listing the known ones and the close matches.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from features.augment_config import AugmentConfig  # light: no albumentations, cv2 or torch

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "constant", "step", "cosine_restarts")
TTA_MODES = ("none", "hflip")
LOSSES = ("metric", "bce")
LR_SCALES = ("auto", "linear", "sqrt", "none")
SELECTS = ("best", "last")
MIN_IMG_SIZE = 32  # the smallest input every backbone of the zoo accepts (five stride-2 stages)


@dataclass(frozen=True)
class ModelSpec:
    """What a named level-1 model is; every field can be overridden from the command line."""

    name: str
    arch: str  # a timm model name
    combination: str  # a features.windows combination name; sets the input channels
    img_size: int
    batch_size: int
    epochs: int
    optimizer: str = "adamw"
    lr: float = 1e-3
    # The global batch ``lr`` is set for (0: batch_size). A run at another global batch (BATCH=,
    # GPUS=, accumulate) moves lr by ``lr_scale``: linear or sqrt in the batch ratio; auto = timm's
    # rule, sqrt for the Adam family and linear for SGD; none keeps lr.
    lr_batch: int = 0
    lr_scale: str = "auto"
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"  # per optimiser step, after a linear warmup (see loop.make_scheduler)
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # the cosine schedules' floor, as a share of the peak lr
    restart_epochs: float = 0.0  # cosine_restarts: epochs per cosine cycle
    lr_milestones: tuple[int, ...] = ()  # step: after each of these epochs lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    # Share of the training images one epoch draws (a new seeded sample each epoch): 1st place's
    # many short epochs. Validation and checkpoints still come once per epoch.
    epoch_fraction: float = 1.0
    loss: str = "metric"  # metric: BCE weighted like the competition metric (any x2); bce: plain mean BCE
    # Exponential moving average of the weights (decay per optimiser step, timm's ModelEmaV3 with
    # warmup; 0: off). The average is what is validated, kept as best.pt and predicted with.
    ema: float = 0.0
    patience: int = 3  # early stopping: epochs without a better validation loss (select=best only)
    # Which epoch's weights a fold keeps (best.pt) and predicts with: best = the lowest validation
    # loss (chosen on the fold it then reports, so its OOF flatters it); last = the final epoch,
    # every epoch run (no early stopping), so the OOF is not chosen on itself.
    select: str = "best"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    output_stride: int = 32  # < 32 dilates the last stages (timm's output_stride)
    augment: bool = True  # false: no training augmentation at all, whatever ``aug`` says
    aug: AugmentConfig = AugmentConfig()  # which augmentations and how strong (--set aug.rotate=30)
    tta: str = "hflip"  # test-time augmentation of the final OOF and test predictions (and make predict)
    val_tta: str = "none"  # test-time augmentation of the validation pass after every epoch
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    cpu_friendly: bool = False  # small enough to train on a CPU (demo, tests)
    description: str = ""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"spec {self.name}: unknown scheduler {self.scheduler!r}; known: {', '.join(SCHEDULERS)}")
        for field_name, value, known in (("optimizer", self.optimizer, OPTIMIZERS), ("tta", self.tta, TTA_MODES),
                                         ("val_tta", self.val_tta, TTA_MODES), ("loss", self.loss, LOSSES),
                                         ("lr_scale", self.lr_scale, LR_SCALES),
                                         ("select", self.select, SELECTS)):
            if value not in known:
                raise ValueError(f"spec {self.name}: unknown {field_name} {value!r}; known: {', '.join(known)}")
        if not 0.0 < self.epoch_fraction <= 1.0:
            raise ValueError(f"spec {self.name}: epoch_fraction must be in (0, 1], got {self.epoch_fraction}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"spec {self.name}: ema is a decay in [0, 1) (0: off), got {self.ema}")
        if not 0.0 <= self.min_lr_ratio < 1.0:
            raise ValueError(f"spec {self.name}: min_lr_ratio must be in [0, 1), got {self.min_lr_ratio}")
        if self.scheduler == "cosine_restarts" and self.restart_epochs <= 0:
            raise ValueError(f"spec {self.name}: scheduler cosine_restarts needs restart_epochs > 0")
        if self.scheduler == "step" and not self.lr_milestones:
            raise ValueError(f"spec {self.name}: scheduler step needs lr_milestones (epochs, e.g. 3,4)")
        if self.lr_batch < 0:
            raise ValueError(f"spec {self.name}: lr_batch must be >= 0 (0: batch_size), got {self.lr_batch}")
        for field_name in ("batch_size", "epochs"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"spec {self.name}: {field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.img_size < MIN_IMG_SIZE:  # the backbones downsample by 32: smaller inputs vanish to nothing
            raise ValueError(f"spec {self.name}: img_size must be >= {MIN_IMG_SIZE} px (IMG_SIZE=, --img-size), "
                             f"got {self.img_size}")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"spec {self.name}: output_stride must be 8, 16 or 32, got {self.output_stride}")


class UnknownModelError(KeyError):
    """A model name that is not in the registry; the message lists the known and close names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


_REGISTRY: dict[str, Callable[[], ModelSpec]] = {}

SpecFn = TypeVar("SpecFn", bound=Callable[[], ModelSpec])


def register_model(fn: SpecFn) -> SpecFn:
    """Register a spec under its function's name (the function returns the ModelSpec)."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model spec {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def _ensure_zoo() -> None:
    # The zoo module registers its specs on import; importing it here keeps the registry
    # usable from `registry` alone without a circular import at module load.
    import level1_models.zoo  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching an fnmatch pattern (like timm.list_models), sorted."""
    _ensure_zoo()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; an unknown name lists known and close ones."""
    _ensure_zoo()
    try:
        fn = _REGISTRY[name]
    except KeyError:
        # Names that start with what was typed (rsna2nd -> rsna2nd_resnext101_wsl), then similar ones.
        starting = sorted(n for n in _REGISTRY if n.startswith(name))[:3]
        close = list(dict.fromkeys([*starting, *difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)]))[:3]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))} "
            f"(python -m level1_models list)"
        ) from None
    spec = fn()
    if spec.name != name:
        raise ValueError(f"spec function {name!r} returned a spec named {spec.name!r}")
    return spec
