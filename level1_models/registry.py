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
SCHEDULERS = ("cosine", "constant")
TTA_MODES = ("none", "hflip")
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
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"  # per step, after a linear warmup
    warmup_epochs: float = 0.0
    patience: int = 3  # early stopping: epochs without a better validation loss
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    output_stride: int = 32  # < 32 dilates the last stages (timm's output_stride)
    augment: bool = True  # false: no training augmentation at all, whatever ``aug`` says
    aug: AugmentConfig = AugmentConfig()  # which augmentations and how strong (--set aug.rotate=30)
    tta: str = "hflip"  # test-time augmentation for validation and test predictions
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    cpu_friendly: bool = False  # small enough to train on a CPU (demo, tests)
    description: str = ""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"spec {self.name}: unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"spec {self.name}: unknown scheduler {self.scheduler!r}; known: {', '.join(SCHEDULERS)}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"spec {self.name}: unknown tta {self.tta!r}; known: {', '.join(TTA_MODES)}")
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
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))} "
            f"(python -m level1_models list)"
        ) from None
    spec = fn()
    if spec.name != name:
        raise ValueError(f"spec function {name!r} returned a spec named {spec.name!r}")
    return spec
