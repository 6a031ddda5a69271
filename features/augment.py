"""Training augmentations (albumentations), split in two so that each runs where it is cheapest.

- Geometric (flips, crop, Affine shift-scale-rotate, and with ``distort`` > 0 one of elastic /
  grid / optical distortion) runs on the HU slices *before* windowing: a 3-window combination of
  one slice warps one channel, not three, the K slices of a 2.5D stack get one and the same warp,
  and the border is filled with air (-1024 HU), which every window maps to black.
- Photometric (brightness/contrast, CoarseDropout random erasing) runs on the windowed [0, 1]
  channels.
- ``channel_swap`` (reversing a 2.5D stack's slices) is drawn by :meth:`Augmenter.swap_slices`;
  the dataset reverses the K slices (and their header windows) before windowing.

Which transforms run and how strongly is an :class:`AugmentConfig` (``features.augment_config``,
re-exported here), one per model spec (``ModelSpec.aug``, ``--set aug.rotate=30``). A transform
whose probability is 0 is left out of the pipeline, so a new transform at 0 does not shift the
random draws of the others.

All are off at validation (the dataset does not call them). The random state is per process and
seeded from ``torch.initial_seed()``, which PyTorch sets differently in each DataLoader worker and
epoch, so workers do not repeat each other's augmentations and a seeded run is reproducible.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from features.augment_config import AugmentConfig
from features.cache import HU_MIN

__all__ = ["Affine", "AugmentConfig", "Augmenter", "BrightnessContrast", "SmoothElastic", "geometric_transform",
           "photometric_transform"]


class BrightnessContrast(A.RandomBrightnessContrast):
    """RandomBrightnessContrast (same parameters and sampling) with a plain float32 apply:
    albucore's float path goes through float64 OpenCV calls and costs ~3 ms on 3 x 256 x 256."""

    def apply(self, img: np.ndarray, alpha: float, beta: float, **params) -> np.ndarray:
        if img.dtype != np.float32:
            return super().apply(img, alpha, beta, **params)
        out = np.multiply(img, np.float32(alpha), dtype=np.float32)
        out += np.float32(beta)
        return np.clip(out, 0.0, 1.0, out=out)


class Affine(A.Affine):
    """A.Affine (same parameters and sampling) whose apply calls cv2.warpAffine directly for up to
    four channels, skipping albumentations' per-call identity test and chunking (~40% of its cost)."""

    def apply(self, img: np.ndarray, matrix: np.ndarray, output_shape: tuple[int, int], **params) -> np.ndarray:
        if img.ndim == 3 and img.shape[2] > 4:  # cv2 fills at most four channels: albumentations chunks
            return super().apply(img, matrix, output_shape, **params)
        size = (int(round(output_shape[1])), int(round(output_shape[0])))
        # A scalar borderValue would fill only the first channel: cv2 wants one value per channel.
        fill = tuple(self.fill) if isinstance(self.fill, (tuple, list)) else (float(self.fill),) * 4
        out = cv2.warpAffine(img, matrix[:2], size, flags=self.interpolation, borderMode=self.border_mode,
                             borderValue=fill)
        return out[..., None] if img.ndim == 3 and out.ndim == 2 else out


# cv2 fills only the first channel with a scalar borderValue: one value per channel (up to four;
# albumentations hands cv2 more channels in chunks of four, each with the same map).
AIR_FILL = (float(HU_MIN),) * 4

# The distortions' strengths (each a share of the side, so they look the same at any input size).
ELASTIC_MAGNITUDE = 0.012  # std of the elastic displacement: ~3 px at 256
ELASTIC_CELLS = 5  # the elastic field varies over about a fifth of the side
GRID_LIMIT = 0.3  # GridDistortion's distort_limit (albumentations' default, which the 3rd place used)
OPTICAL_LIMIT = 0.3  # OpticalDistortion's distort_limit: ~2.5 px median displacement at 256


class SmoothElastic(A.ElasticTransform):
    """An elastic warp at a fraction of ElasticTransform's cost: the displacement field is Gaussian
    noise on a (cells + 1)^2 grid, bicubic-upsampled to the image, instead of full-size noise blurred
    with a wide Gaussian (~10-20 ms at 256 px on one core; this is the remap's ~1 ms). ``magnitude``
    is the displacement's standard deviation as a share of the side. The random state is the
    transform's own (seeded with the Compose), and the apply is ElasticTransform's remap, so every
    channel gets the same warp and the border ``fill``."""

    def __init__(self, magnitude: float = ELASTIC_MAGNITUDE, cells: int = ELASTIC_CELLS, **kwargs):
        super().__init__(**kwargs)
        self.magnitude, self.cells = float(magnitude), int(cells)

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        coarse = self.random_generator.standard_normal((self.cells + 1, self.cells + 1, 2)).astype(np.float32)
        coarse *= np.float32(self.magnitude * max(height, width))
        field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        ys, xs = np.indices((height, width), dtype=np.float32)
        return {"map_x": xs + field[..., 0], "map_y": ys + field[..., 1]}


def distortion(p: float) -> A.OneOf:
    """One of elastic / grid / optical distortion with probability ``p`` (3rd place, 2019), linear
    interpolation, the border filled with air."""
    common = {"interpolation": cv2.INTER_LINEAR, "border_mode": cv2.BORDER_CONSTANT, "fill": AIR_FILL, "p": 1.0}
    return A.OneOf(
        [
            SmoothElastic(**common),
            A.GridDistortion(num_steps=5, distort_limit=GRID_LIMIT, **common),
            A.OpticalDistortion(distort_limit=OPTICAL_LIMIT, **common),
        ],
        p=p,
    )


def geometric_transform(size: int, cfg: AugmentConfig = AugmentConfig(), seed: int | None = None) -> A.Compose:
    """For H x W x K float32 HU slices; output size x size x K (one warp for all K)."""
    extra = [distortion(cfg.distort)] if cfg.distort > 0 else []
    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip),
            A.VerticalFlip(p=cfg.vflip),
            A.RandomResizedCrop(size=(size, size), scale=cfg.crop_scale, ratio=(0.9, 1.1), p=cfg.crop),
            Affine(
                translate_percent=(-cfg.shift, cfg.shift),
                scale=cfg.scale,
                rotate=(-cfg.rotate, cfg.rotate),
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_CONSTANT,
                fill=float(HU_MIN),
                p=cfg.affine,
            ),
            *extra,
        ],
        seed=seed,
    )


def photometric_transform(cfg: AugmentConfig = AugmentConfig(), seed: int | None = None) -> A.Compose:
    """For C x H x W float32 windowed channels in [0, 1], passed as ``images=``."""
    return A.Compose(
        [
            BrightnessContrast(
                brightness_limit=cfg.brightness, contrast_limit=cfg.contrast, p=cfg.brightness_contrast
            ),
            A.CoarseDropout(
                num_holes_range=cfg.erase_holes,
                hole_height_range=cfg.erase_size,
                hole_width_range=cfg.erase_size,
                fill=0.0,
                p=cfg.erase,
            ),
        ],
        seed=seed,
    )


class Augmenter:
    """The stages with one seed: ``swap_slices`` (the channel swap's draw), ``geometric`` on
    H x W (x K) HU, ``photometric`` on C x H x W."""

    def __init__(self, size: int, cfg: AugmentConfig = AugmentConfig(), seed: int | None = None):
        self.cfg = cfg
        self.geo = geometric_transform(size, cfg, seed)
        self.photo = photometric_transform(cfg, None if seed is None else seed + 1)
        self.swap_rng = np.random.default_rng(None if seed is None else seed + 2)

    def reseed(self, seed: int) -> None:
        """Restart every stage's random state (the training loop does this per batch, so an image's
        augmentation does not depend on which worker loads it)."""
        self.geo.set_random_seed(seed)
        self.photo.set_random_seed(seed + 1)
        self.swap_rng = np.random.default_rng(seed + 2)

    def swap_slices(self, n_slices: int) -> bool:
        """Whether to reverse this item's ``n_slices`` slices (``channel_swap``); never for one slice.
        Draws only when the probability is above 0, from a generator of its own."""
        if n_slices < 2 or self.cfg.channel_swap <= 0:
            return False
        return bool(self.swap_rng.random() < self.cfg.channel_swap)

    def geometric(self, hu: np.ndarray) -> np.ndarray:
        """H x W or H x W x K HU in, the same layout out."""
        out = self.geo(image=hu)["image"]
        return out[..., None] if hu.ndim == 3 and out.ndim == 2 else out

    def photometric(self, image_chw: np.ndarray) -> np.ndarray:
        """C x H x W in and out. The channels go in as albumentations' ``images`` (a stack of
        grayscale images sharing one set of parameters): the same brightness and the same holes on
        every channel, with no channels-last transposing copy (which costs more than the transforms)."""
        return self.photo(images=image_chw)["images"]
