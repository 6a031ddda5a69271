"""CT window presets and the named window combinations that level-1 models pick by name.

A *window* maps Hounsfield units (HU) to [0, 1]: ``center`` and ``width`` pick the HU range that
gets the full contrast. A *combination* is the list of channels one model sees; each channel is a
window applied to the current slice or to a neighbour in the series (``offset`` -1 = the previous
slice in z order, +1 = the next). Adding a combination is one line in ``COMBINATIONS``.

Two transforms are offered: the plain linear window (clip to [0, 1]) and the sigmoid window of the
2019 Kaggle kernels, ``sigmoid(2 * ln(1/eps - 1) * (hu - center) / width)``, which equals ``eps``
and ``1 - eps`` at the linear window's two edges but keeps some contrast outside them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Transform = Literal["linear", "sigmoid"]
TRANSFORMS: tuple[str, ...] = ("linear", "sigmoid")

# The pseudo-preset that means "the file's own WindowCenter / WindowWidth header".
HEADER = "header"
# Used where a header window is missing or unusable (width <= 0, NaN).
FALLBACK_HEADER_WINDOW = (40.0, 80.0)
# The sigmoid window reaches SIGMOID_EPS and 1 - SIGMOID_EPS at center -/+ width / 2.
SIGMOID_EPS = 1.0 / 255.0


@dataclass(frozen=True)
class Window:
    center: float
    width: float


PRESETS: dict[str, Window] = {
    "brain": Window(40, 80),
    "subdural": Window(80, 200),
    "bone": Window(600, 2800),
    "soft": Window(40, 380),  # soft tissue
    "stroke": Window(32, 8),
    "blood": Window(60, 40),  # narrow window around fresh blood (~50-70 HU)
}


@dataclass(frozen=True)
class Channel:
    window: str  # a PRESETS name or HEADER
    offset: int = 0  # slice offset within the series, in z order

    @classmethod
    def parse(cls, spec: str) -> "Channel":
        """``"brain"`` -> current slice; ``"brain@-1"`` -> previous slice; ``"bone@+2"``."""
        name, _, offset = spec.partition("@")
        if name != HEADER and name not in PRESETS:
            raise ValueError(f"unknown window {name!r} in {spec!r}; known: {sorted(PRESETS) + [HEADER]}")
        return cls(name, int(offset) if offset else 0)


@dataclass(frozen=True)
class Combination:
    channels: tuple[Channel, ...]
    transform: Transform = "linear"

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("a window combination needs at least one channel")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown window transform {self.transform!r}; known: {TRANSFORMS}")

    @property
    def offsets(self) -> tuple[int, ...]:
        """The distinct slice offsets read, sorted: each costs one cache read per item."""
        return tuple(sorted({c.offset for c in self.channels}))

    @property
    def uses_header(self) -> bool:
        return any(c.window == HEADER for c in self.channels)

    def __len__(self) -> int:
        return len(self.channels)


def combo(*specs: str, transform: Transform = "linear") -> Combination:
    return Combination(tuple(Channel.parse(s) for s in specs), transform)


# name -> channels. One line per combination; models refer to these names.
COMBINATIONS: dict[str, Combination] = {
    "bsb": combo("brain", "subdural", "bone"),
    "bss": combo("brain", "subdural", "soft"),
    "bsb_sigmoid": combo("brain", "subdural", "bone", transform="sigmoid"),
    "bss_sigmoid": combo("brain", "subdural", "soft", transform="sigmoid"),
    "brain3": combo("brain@-1", "brain", "brain@+1"),  # 2.5D: previous, current, next slice
    "subdural3": combo("subdural@-1", "subdural", "subdural@+1"),
    "meta3": combo("header@-1", "header", "header@+1"),  # each slice's own header window
    "bsb3": combo(  # 9 channels: bsb of the previous, current and next slice
        "brain@-1", "subdural@-1", "bone@-1", "brain", "subdural", "bone", "brain@+1", "subdural@+1", "bone@+1"
    ),
    "brain": combo("brain"),
    "header": combo("header"),
}


def list_combinations() -> list[str]:
    return sorted(COMBINATIONS)


def get_combination(name: str) -> Combination:
    try:
        return COMBINATIONS[name]
    except KeyError:
        raise KeyError(f"unknown window combination {name!r}; known: {', '.join(list_combinations())}") from None


def n_channels(name: str) -> int:
    return len(get_combination(name))


def window_linear(hu: np.ndarray, center: float, width: float, out: np.ndarray | None = None) -> np.ndarray:
    """``clip((hu - (center - width / 2)) / width, 0, 1)`` as float32 (as one multiply-add)."""
    out = np.multiply(hu, np.float32(1.0 / width), out=out, dtype=np.float32)
    out += np.float32(-(center - width / 2.0) / width)
    return np.clip(out, 0.0, 1.0, out=out)


def window_sigmoid(hu: np.ndarray, center: float, width: float, out: np.ndarray | None = None) -> np.ndarray:
    """``1 / (1 + exp(-2 * ln(1/eps - 1) * (hu - center) / width))`` as float32."""
    gain = np.float32(2.0 * math.log(1.0 / SIGMOID_EPS - 1.0) / width)
    out = np.subtract(hu, np.float32(center), out=out, dtype=np.float32)
    out *= -gain
    np.clip(out, -80.0, 80.0, out=out)  # exp(80) is finite in float32; the result is 0 or 1 anyway
    np.exp(out, out=out)
    out += 1.0
    return np.reciprocal(out, out=out)


WINDOW_FUNCTIONS = {"linear": window_linear, "sigmoid": window_sigmoid}


def usable_header_window(center: float, width: float) -> tuple[float, float]:
    """The header window, or the brain window where the header's is missing or degenerate."""
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        return FALLBACK_HEADER_WINDOW
    return float(center), float(width)


def apply_combination(
    combination: Combination | str,
    slices: np.ndarray,
    header_windows: np.ndarray | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Window a stack of HU slices into the combination's channels.

    ``slices`` is K x H x W (or H x W x K with ``channels_last``), one slice per entry of
    ``combination.offsets`` in that order; ``header_windows`` is K x 2 (center, width) and needed
    only by combinations using the header window. Returns C x H x W (or H x W x C) float32.
    """
    comb = get_combination(combination) if isinstance(combination, str) else combination
    offsets = comb.offsets
    axis = -1 if channels_last else 0
    if slices.ndim == 2:
        slices = slices[..., None] if channels_last else slices[None]
    if slices.shape[axis] != len(offsets):
        raise ValueError(f"{len(offsets)} slices (offsets {offsets}) needed, got shape {slices.shape}")
    if comb.uses_header and header_windows is None:
        raise ValueError("this combination uses the header window: pass header_windows (K x 2)")
    linear = comb.transform == "linear"
    spatial = slices.shape[:-1] if channels_last else slices.shape[1:]
    out = np.empty((*spatial, len(comb)) if channels_last else (len(comb), *spatial), np.float32)
    for c, channel in enumerate(comb.channels):
        k = offsets.index(channel.offset)
        if channel.window == HEADER:
            center, width = usable_header_window(*header_windows[k])
        else:
            center, width = PRESETS[channel.window].center, PRESETS[channel.window].width
        source = slices[..., k] if channels_last else slices[k]
        target = out[..., c] if channels_last else out[c]
        if linear:  # hu * scale + offset here, clipped once for all channels below
            np.multiply(source, np.float32(1.0 / width), out=target, dtype=np.float32)
            target += np.float32(-(center - width / 2.0) / width)
        else:
            window_sigmoid(source, center, width, out=target)
    if linear:
        np.clip(out, 0.0, 1.0, out=out)
    return out
