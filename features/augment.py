"""Training augmentations (albumentations), split in two so that each runs where it is cheapest.

- Geometric (flips, crop, Affine shift-scale-rotate) runs on the HU slices *before* windowing:
  a 3-window combination of one slice warps one channel, not three, and the border is filled
  with air (-1024 HU), which every window maps to black.
- Photometric (brightness/contrast, CoarseDropout random erasing) runs on the windowed [0, 1]
  channels.

Which transforms run and how strongly is an :class:`AugmentConfig` (``features.augment_config``,
re-exported here), one per model spec (``ModelSpec.aug``, ``--set aug.rotate=30``).

Both are off at validation (the dataset does not call them). The random state is per process and
seeded from ``torch.initial_seed()``, which PyTorch sets differently in each DataLoader worker and
epoch, so workers do not repeat each other's augmentations and a seeded run is reproducible.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from features.augment_config import AugmentConfig
from features.cache import HU_MIN

__all__ = ["Affine", "AugmentConfig", "Augmenter", "BrightnessContrast", "geometric_transform", "photometric_transform"]


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


def geometric_transform(size: int, cfg: AugmentConfig = AugmentConfig(), seed: int | None = None) -> A.Compose:
    """For H x W x K float32 HU slices; output size x size x K."""
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
    """The two stages with one seed: ``geometric`` on H x W (x K) HU, ``photometric`` on C x H x W."""

    def __init__(self, size: int, cfg: AugmentConfig = AugmentConfig(), seed: int | None = None):
        self.geo = geometric_transform(size, cfg, seed)
        self.photo = photometric_transform(cfg, None if seed is None else seed + 1)

    def reseed(self, seed: int) -> None:
        """Restart both stages' random state (the training loop does this per batch, so an image's
        augmentation does not depend on which worker loads it)."""
        self.geo.set_random_seed(seed)
        self.photo.set_random_seed(seed + 1)

    def geometric(self, hu: np.ndarray) -> np.ndarray:
        """H x W or H x W x K HU in, the same layout out."""
        out = self.geo(image=hu)["image"]
        return out[..., None] if hu.ndim == 3 and out.ndim == 2 else out

    def photometric(self, image_chw: np.ndarray) -> np.ndarray:
        """C x H x W in and out. The channels go in as albumentations' ``images`` (a stack of
        grayscale images sharing one set of parameters): the same brightness and the same holes on
        every channel, with no channels-last transposing copy (which costs more than the transforms)."""
        return self.photo(images=image_chw)["images"]
