"""A run's configuration: the named spec, the run options, and command-line overrides.

``TrainConfig`` is one flat record (spec fields + run fields) so that ``--set key=value`` can
override any of them; the one nested record, the spec's augmentations ``aug``, is overridden a
field at a time (``--set aug.rotate=30``); ``resolve`` fixes the automatic choices (device, mixed precision,
channels-last) so the saved ``config.json`` says exactly what ran.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.augment_config import FIELD_NAMES as AUG_FIELD_NAMES
from features.augment_config import FIELD_TYPES as AUG_TYPES
from features.augment_config import AugmentConfig
from level1_models.registry import ModelSpec, get_spec
from level1_models.tracking import TRACKERS

AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")

# Fields that decide what a checkpoint *is*: a model folder trained with other values cannot be
# resumed or mixed with this run.
IDENTITY_FIELDS = ("arch", "combination", "img_size", "output_stride")


class ConfigError(ValueError):
    """A bad override or option; the message names the field and the fix."""


@dataclass(frozen=True)
class TrainConfig(ModelSpec):
    folds: tuple[int, ...] | None = None  # None: every fold of the folds table
    limit: int | None = None  # at most this many training images per fold (validation stays whole)
    device: str = "auto"  # auto | cpu | cuda (cuda:<i> accepted)
    workers: int | None = None  # DataLoader worker processes per training process (None: cores / processes on this node)
    prefetch: int = 4  # batches each worker prepares ahead
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    seed: int = 42
    amp: str = "auto"  # auto: bf16 on CUDA where supported, else fp16 on CUDA, off on CPU
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False  # torch.compile the model
    pretrained: bool = True  # use ImageNet weights when found locally
    pretrained_file: str | None = None  # a local weights file (overrides timm's cache)
    require_pretrained: bool = False  # missing weights are an error instead of training from scratch
    eval_batch_size: int | None = None  # None: 2 x batch_size
    accumulate: int = 1  # micro-batches per optimiser step (gradient accumulation)
    # Under DDP on GPUs: BatchNorm statistics over every process's batch (SyncBatchNorm, one
    # all-reduce per BatchNorm layer and step); false keeps them per GPU, as one-GPU training does.
    sync_bn: bool = True
    checkpoint_minutes: float = 15.0  # also save the resume state every N minutes within an epoch (0: off)
    save_embeddings: bool = True  # pooled features (float16) of the OOF and test images, for level 2
    tracker: str = "tensorboard"  # tensorboard | wandb | mlflow | none: the experiment log (level1_models/tracking.py)
    progress_seconds: float = 60.0  # stderr not a terminal: a plain progress line every N seconds (0: none)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"device must be auto, cpu or cuda[:i], got {self.device!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 images per fold, got {self.limit}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.accumulate < 1:
            raise ConfigError(f"accumulate must be >= 1 micro-batches per step, got {self.accumulate}")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.tracker not in TRACKERS:
            raise ConfigError(f"tracker must be one of {', '.join(TRACKERS)}, got {self.tracker!r}")
        if self.progress_seconds < 0:
            raise ConfigError(f"progress_seconds must be >= 0 (0: no progress lines), got {self.progress_seconds}")

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * world_size * self.accumulate

    @property
    def lr_rule(self) -> str:
        if self.lr_scale == "auto":
            return "linear" if self.optimizer == "sgd" else "sqrt"
        return self.lr_scale

    @property
    def lr_reference_batch(self) -> int:
        """The global batch the spec's lr is for (``lr_batch``; a config saved before it: the batch)."""
        return self.lr_batch or self.batch_size

    def lr_factor(self, world_size: int) -> float:
        """How much the spec's lr moves from its ``lr_batch`` to this run's global batch (``lr_scale``)."""
        ratio = self.global_batch(world_size) / self.lr_reference_batch
        return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[self.lr_rule]

    def lr_note(self, world_size: int) -> str:
        """One line for the start of a run: the lr it trains at and the rule that made it."""
        base = self.lr_reference_batch
        layout = f"{world_size} process{'es' if world_size > 1 else ''} x batch {self.batch_size}"
        layout += f" x accumulate {self.accumulate}" if self.accumulate > 1 else ""
        return (f"{self.name}: lr {self.lr * self.lr_factor(world_size):.3g} at global batch "
                f"{self.global_batch(world_size)} ({layout}): the spec's {self.lr:.3g} at batch {base}, "
                f"x{self.lr_factor(world_size):.3g} by the {self.lr_rule} rule (lr_scale={self.lr_scale}; "
                f'SET="lr_scale=none" keeps the spec\'s lr)')

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists, ``aug`` a dict of its fields)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """The inverse of ``to_dict``; keys that are not fields are ignored, and a config without
        ``aug`` (written before specs chose their augmentations) gets the default AugmentConfig."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        for name in _TUPLE_FIELDS:  # JSON keeps tuples as lists
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        if kwargs.get("aug") is None:
            kwargs.pop("aug", None)
        elif isinstance(kwargs["aug"], Mapping):
            kwargs["aug"] = AugmentConfig.from_dict(kwargs["aug"])
        return cls(**kwargs)

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


_TYPES = typing.get_type_hints(TrainConfig)
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
_TUPLE_FIELDS = tuple(name for name, kind in _TYPES.items()
                      if typing.get_origin(kind) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(kind)))
AUG = "aug."  # the prefix of an augmentation field: --set aug.rotate=30


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {text!r}")


def is_field(name: str) -> bool:
    """A top-level field, or ``aug.<field>`` of the augmentations."""
    return name in FIELD_NAMES or (name.startswith(AUG) and name[len(AUG):] in AUG_FIELD_NAMES)


def _unknown(what: str, name: str, key: str, names: Iterable[str], prefix: str = "") -> ConfigError:
    """The error of an unknown field: its close matches, then every known name."""
    names = list(names)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown {what} {name!r}.{hint} {what.capitalize()}s: {', '.join(prefix + n for n in names)}")


def parse_field(name: str, text: str) -> Any:
    """Parse the command-line text of one field by the field's declared type; ``aug.<field>``
    parses one augmentation field (``aug.rotate=30``, ``aug.scale=0.85,1.15``)."""
    if name.startswith(AUG):
        sub = name[len(AUG):]
        if sub not in AUG_TYPES:
            raise _unknown("augmentation field", name, sub, AUG_FIELD_NAMES, prefix=AUG)
        return _parse_typed(name, AUG_TYPES[sub], text)
    if name == "aug":
        raise ConfigError(f"aug is set one field at a time, e.g. --set aug.rotate=30 (SET=\"aug.rotate=30 "
                          f"aug.erase=0.5\"); fields: {', '.join(AUG + f for f in AUG_FIELD_NAMES)}")
    if name not in _TYPES:
        raise _unknown("config field", name, name, FIELD_NAMES)
    return _parse_typed(name, _TYPES[name], text)


def _parse_typed(name: str, kind: Any, text: str) -> Any:
    args = typing.get_args(kind)
    optional = isinstance(kind, types.UnionType) and type(None) in args
    if optional:
        if text.strip().lower() in ("none", "null", ""):
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        if kind is bool:
            return _parse_bool(name, text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if typing.get_origin(kind) is tuple:  # tuple[int, ...] or fixed, e.g. tuple[float, float]
            elems = typing.get_args(kind)
            parts = [part for part in text.split(",") if part.strip()]
            if Ellipsis in elems:
                return tuple(elems[0](part) for part in parts)
            if len(parts) != len(elems):
                raise ConfigError(f"{name}: expected {len(elems)} comma-separated values, got {text!r}")
            return tuple(elem(part) for elem, part in zip(elems, parts))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{name}: cannot read {text!r} as {getattr(kind, '__name__', kind)} ({err})") from None
    raise ConfigError(f"{name}: unsupported field type {kind}")


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=3e-4", "augment=false"]`` -> typed overrides."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_field(key.strip().replace("-", "_"), value)
    return out


def build_config(name: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The named spec with overrides applied (None values mean "not given"); ``aug.<field>`` keys
    override one field of the spec's augmentations, ``aug`` (an AugmentConfig) all of them."""
    spec = get_spec(name)
    values = dataclasses.asdict(spec)
    # The spec's lr belongs to the spec's batch: BATCH= then moves lr by the spec's rule.
    values["lr_batch"] = spec.lr_batch or spec.batch_size
    for key, value in (overrides or {}).items():
        if not is_field(key):
            parse_field(key, "")  # raises the unknown-field error with close matches
        if key == "name" and value != name:
            raise ConfigError("the model name is chosen with --model, not --set name=")
        if key.startswith(AUG):
            values["aug"][key[len(AUG):]] = value
        elif key == "aug" and isinstance(value, AugmentConfig):
            values["aug"] = dataclasses.asdict(value)
        else:
            values[key] = value
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model {name}: {err}") from None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(local_processes: int) -> int:
    """Loader workers per training process: this node's cores shared by its processes (GPUs).

    ``local_processes`` is torchrun's LOCAL_WORLD_SIZE: independent jobs on one machine do not see
    each other, so ``--spread folds`` passes each its share (``--workers``), and jobs started by
    hand side by side should set WORKERS=."""
    return max(1, available_cores() // max(1, local_processes))


def resolve(cfg: TrainConfig, cuda_available: bool, bf16_supported: bool, local_rank: int = 0,
            local_processes: int = 1) -> TrainConfig:
    """Fix the automatic choices for this machine: device, mixed precision, channels-last, workers."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device.startswith("cuda"):
        if not cuda_available:
            raise ConfigError("device cuda requested but torch sees no CUDA GPU; use --device cpu")
        if device == "cuda":
            device = f"cuda:{local_rank}"
    amp = cfg.amp
    if amp == "auto":
        amp = ("bf16" if bf16_supported else "fp16") if device.startswith("cuda") else "off"
    channels_last = device.startswith("cuda") if cfg.channels_last is None else cfg.channels_last
    workers = default_workers(local_processes) if cfg.workers is None else cfg.workers
    return dataclasses.replace(cfg, device=device, amp=amp, channels_last=channels_last, workers=workers)


def read_config(path: Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads(Path(path).read_text()))
