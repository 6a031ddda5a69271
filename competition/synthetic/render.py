"""Slicing a planned study into CT images (HU), bleed occupancy and slice labels.

A slice is a plane in patient coordinates given by its DICOM geometry (ImagePositionPatient,
ImageOrientationPatient with the gantry tilt, PixelSpacing); the head is cut through its own pose.
Small images are rendered finer and averaged down (partial volume in-plane); bleeds are averaged
over five planes across the slice thickness (partial volume through-plane), then the image gets
a reconstruction blur and correlated noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from competition.constants import SUBTYPES
from competition.synthetic.plan import StudyPlan

SUBPLANES = (-0.4, -0.2, 0.0, 0.2, 0.4)  # offsets across the slice thickness, in slice spacings
MIN_RENDER = 128  # images smaller than this are rendered finer and averaged down
MASK_OCCUPANCY = 0.2  # a truth-mask pixel is at least this much blood


@dataclass
class SliceImage:
    index: int  # 0 = lowest slice
    hu: np.ndarray  # float32 (size, size)
    occupancy: np.ndarray  # float32 (n_subtypes, size, size): share of the pixel's volume that is blood
    ipp: tuple[float, float, float]  # ImagePositionPatient
    area_mm2: np.ndarray  # blood area per subtype (occupancy-weighted), mm^2

    def labels(self, min_area_mm2: float) -> np.ndarray:
        """Six 0/1 labels in LABELS order: a subtype when enough of it shows, then `any`."""
        sub = (self.area_mm2 >= min_area_mm2).astype(np.int8)
        return np.append(sub, np.int8(sub.any()))

    def mask_bits(self) -> np.ndarray:
        """uint8 (size, size): bit i set where SUBTYPES[i] occupies the pixel."""
        bits = np.zeros(self.hu.shape, dtype=np.uint8)
        for i in range(len(SUBTYPES)):
            bits |= ((self.occupancy[i] >= MASK_OCCUPANCY).astype(np.uint8) << i)
        return bits


def orientation(tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines of a slice tilted about the patient's left-right axis."""
    t = np.deg2rad(tilt_deg)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), -np.sin(t)])


def image_position(study: StudyPlan, k: int) -> np.ndarray:
    """ImagePositionPatient (centre of the top-left pixel) of slice k."""
    row_dir, col_dir = orientation(study.tilt_deg)
    half = (study.size - 1) / 2 * study.pixel_spacing
    centre = np.array([study.image_centre[0], study.image_centre[1], study.z0 + k * study.spacing])
    return centre - half * row_dir - half * col_dir


def _grid(study: StudyPlan, k: int, n: int, offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head coordinates of an n x n pixel grid covering slice k, moved `offset` mm along its normal."""
    row_dir, col_dir = orientation(study.tilt_deg)
    normal = np.cross(row_dir, col_dir)
    step = study.pixel_spacing * study.size / n
    # Centre of the top-left fine pixel.
    corner = image_position(study, k) + (step - study.pixel_spacing) / 2 * (row_dir + col_dir) + offset * normal
    inv = study.pose.T
    q0 = inv @ (corner - study.centre)
    du, dv = inv @ row_dir * step, inv @ col_dir * step
    c = np.arange(n, dtype=np.float32)
    out = []
    for a in range(3):
        out.append((np.float32(q0[a]) + c[None, :] * np.float32(du[a]) + c[:, None] * np.float32(dv[a])).astype(np.float32))
    return out[0], out[1], out[2]


def _downsample(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    n = a.shape[-1] // f
    return a.reshape(*a.shape[:-2], n, f, n, f).mean(axis=(-3, -1))


def _occupancy(study: StudyPlan, k: int, n: int, centre_grid=None) -> np.ndarray:
    """Share of each pixel's volume filled by each subtype, (n_subtypes, n, n), over the slab."""
    head = study.head
    occupancy = np.zeros((len(SUBTYPES), n, n), dtype=np.float32)
    row_dir, col_dir = orientation(study.tilt_deg)
    normal = study.pose.T @ np.cross(row_dir, col_dir)
    on_plane = study.pose.T @ (image_position(study, k) - study.centre)
    for bleed in study.bleeds:
        if abs(float(np.dot(np.asarray(bleed.centre) - on_plane, normal))) > bleed.extent + study.spacing / 2:
            continue  # the bleed's bounding ball misses this slab
        for offset in SUBPLANES:
            if offset == 0 and centre_grid is not None:
                xs, ys, zs = centre_grid
            else:
                xs, ys, zs = _grid(study, k, n, offset * study.spacing)
            c = bleed.centre
            near = (xs - c[0]) ** 2 + (ys - c[1]) ** 2 + (zs - c[2]) ** 2 < bleed.extent**2
            if not near.any():
                continue
            idx = np.nonzero(near)
            px, py, pz = xs[idx], ys[idx], zs[idx]
            g = head.geometry(px, py, pz)
            t = head.tissue(px, py, pz, g)[0] if bleed.needs_tissue else None
            hit = bleed.mask(px, py, pz, head, g, t)
            occupancy[SUBTYPES.index(bleed.subtype)][idx] += hit.astype(np.float32) / len(SUBPLANES)
    return np.clip(occupancy, 0, 1)


def study_areas(study: StudyPlan) -> np.ndarray:
    """Blood area per slice and subtype (n_slices, n_subtypes), mm^2, without rendering images:
    the labels alone, for checking prevalence over many studies quickly."""
    f = max(1, -(-MIN_RENDER // study.size))
    n = study.size * f
    areas = np.zeros((study.n_slices, len(SUBTYPES)), dtype=np.float32)
    for k in range(study.n_slices):
        occ = _downsample(_occupancy(study, k, n), f)
        areas[k] = occ.sum(axis=(1, 2)) * study.pixel_spacing**2
    return areas


def render_slice(study: StudyPlan, k: int, rng: np.random.Generator) -> SliceImage:
    head, knobs = study.head, study.knobs
    f = max(1, -(-MIN_RENDER // study.size))
    n = study.size * f
    x, y, z = _grid(study, k, n, 0.0)
    geo = head.geometry(x, y, z)
    tissue, bone_hu = head.tissue(x, y, z, geo)
    hu = head.hu_of(tissue, bone_hu)
    # Beam hardening: the brain just inside the skull reads a few HU denser (a subdural mimic).
    hu += np.where(geo.cavity, 4.0 * np.exp(-np.clip(geo.depth_in, 0, None) / 3.0), 0).astype(np.float32)

    occupancy = _occupancy(study, k, n, (x, y, z))
    for bleed in study.bleeds:
        halo = bleed.halo(x, y, z)
        if halo is not None:
            hu = np.where(halo & geo.cavity & (hu < 60), hu - 9, hu)

    # Paint blood over the anatomy, in the order bleeds were listed (later ones on top).
    for bleed in study.bleeds:
        occ = occupancy[SUBTYPES.index(bleed.subtype)]
        if occ.any():
            texture = bleed.hu + 3.0 * head.mottle(x * 0.7, y * 0.7, z * 0.7)
            hu = hu * (1 - occ) + texture * occ

    hu = _downsample(hu, f).astype(np.float32)
    occupancy = _downsample(occupancy, f).astype(np.float32)
    hu = _headrest(study, k, hu)
    hu = cv2.GaussianBlur(hu, (0, 0), 0.55)
    # Scanner noise is correlated over about a millimetre.
    grain = max(0.6, 0.7 / study.pixel_spacing)
    noise = cv2.GaussianBlur(rng.standard_normal(hu.shape).astype(np.float32), (0, 0), grain)
    hu += noise * np.float32(knobs.noise_hu / max(float(noise.std()), 1e-6))
    # Outside the reconstruction circle the scanner writes its padding value.
    r = np.arange(study.size) - (study.size - 1) / 2
    outside = r[None, :] ** 2 + r[:, None] ** 2 > (study.size / 2) ** 2
    hu[outside] = -1024
    hu = np.clip(hu, -1024, 3071)

    return SliceImage(
        index=k, hu=hu, occupancy=occupancy, ipp=tuple(float(v) for v in image_position(study, k)),
        area_mm2=occupancy.sum(axis=(1, 2)) * study.pixel_spacing**2,
    )


def _headrest(study: StudyPlan, k: int, hu: np.ndarray) -> np.ndarray:
    """A plastic head holder cupping the back of the head (patient frame, so it ignores head pose)."""
    n = study.size
    row_dir, col_dir = orientation(study.tilt_deg)
    p0 = image_position(study, k)
    c = np.arange(n, dtype=np.float32) * np.float32(study.pixel_spacing)
    px = p0[0] + c[None, :] * row_dir[0]
    py = p0[1] + c[:, None] * col_dir[1]
    a, b = study.head.axes[0] + 2, study.head.axes[1] + 2
    rho = np.sqrt(((px - study.centre[0]) / a) ** 2 + ((py - study.centre[1]) / b) ** 2)
    shell = (rho > 1) & (rho < 1 + 3 / b) & (py - study.centre[1] > 0.6 * b) & (hu < -500)
    return np.where(shell, np.float32(100), hu)


def render_study(study: StudyPlan):
    """Yield the study's slices, lowest first."""
    rng = np.random.default_rng(study.seed)
    for k in range(study.n_slices):
        yield render_slice(study, k, rng)
