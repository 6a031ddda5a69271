"""How a level-1 model's training images are augmented: one frozen record per model spec.

Kept apart from ``features.augment`` (albumentations, OpenCV) so that the model registry, ``make
list-models`` and the config checks stay light: this module imports nothing heavy. Each field can
be overridden from the command line as ``--set aug.<field>=<value>`` (``SET="aug.rotate=30"``).
Every probability defaults to what the specs trained with before a spec could choose; the 2019
winners' extra transforms (``distort``, ``channel_swap``) default to 0 (off).
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROBABILITIES = ("hflip", "vflip", "crop", "affine", "brightness_contrast", "erase", "distort", "channel_swap")


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5
    vflip: float = 0.1
    crop: float = 0.3  # probability of a random resized crop (zoom into part of the head)
    crop_scale: tuple[float, float] = (0.7, 1.0)  # share of the area kept
    affine: float = 0.7  # probability of shift-scale-rotate
    shift: float = 0.0625  # fraction of the side
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 15.0  # degrees, both ways
    # Probability of one of elastic / grid / optical distortion (3rd place, 2019: a OneOf at p 0.5),
    # on the HU slices with the border filled with air; every slice of a 2.5D stack gets the same warp.
    distort: float = 0.0
    # Probability of reversing a 2.5D stack's slices (previous <-> next: the stack seen flipped in z;
    # 1st place, 2019: channel-order swap). The slices are reversed, not the windowed channels, so a
    # multi-window stack such as bsb3 keeps its window order. A one-slice combination ignores it.
    channel_swap: float = 0.0
    brightness_contrast: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    erase: float = 0.3  # probability of CoarseDropout (random erasing; 1st place used p 0.5)
    erase_holes: tuple[int, int] = (1, 4)
    erase_size: tuple[float, float] = (0.05, 0.15)  # hole side as a fraction of the image side

    def __post_init__(self) -> None:
        for name in PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"aug.{name} is a probability, in [0, 1]; got {value}")
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0, low_open=True)
        _check_range("scale", self.scale, 0.0, None, low_open=True)
        _check_range("erase_holes", self.erase_holes, 1, None)
        _check_range("erase_size", self.erase_size, 0.0, 1.0, low_open=True)
        if not 0.0 <= self.shift < 1.0:
            raise ValueError(f"aug.shift is a fraction of the side, in [0, 1); got {self.shift}")
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"aug.rotate is degrees each way, in [0, 180]; got {self.rotate}")
        for name in ("brightness", "contrast"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"aug.{name} is a limit in [0, 1]; got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AugmentConfig":
        """The inverse of ``to_dict`` (lists back to tuples of the declared element type); keys that
        are not fields are ignored, missing ones take their defaults (a config.json of another version)."""
        kwargs = {}
        for name, value in values.items():
            if name not in FIELD_TYPES:
                continue
            kind = FIELD_TYPES[name]
            if typing.get_origin(kind) is tuple and value is not None:
                elem = typing.get_args(kind)[0]
                value = tuple(elem(v) for v in value)
            kwargs[name] = value
        return cls(**kwargs)


def _check_range(name: str, pair: tuple, low: float, high: float | None, low_open: bool = False) -> None:
    if len(pair) != 2:
        raise ValueError(f"aug.{name} is a (low, high) pair; got {pair}")
    a, b = pair
    if a > b:
        raise ValueError(f"aug.{name} must be ordered low,high; got {a},{b}")
    if a < low or (low_open and a == low):
        raise ValueError(f"aug.{name} must be {'>' if low_open else '>='} {low}; got {a},{b}")
    if high is not None and b > high:
        raise ValueError(f"aug.{name} must be <= {high}; got {a},{b}")


FIELD_TYPES: dict[str, Any] = typing.get_type_hints(AugmentConfig)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AugmentConfig))
