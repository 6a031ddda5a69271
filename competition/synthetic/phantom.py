"""Anatomy of a synthetic head: an analytic 3-D phantom evaluated at arbitrary points.

Head coordinates are millimetres from the head centre: x to the patient's left, y posterior,
z superior (the DICOM patient axes before the head's own pose is applied). Every structure is a
closed-form function of the point, so any slice plane (tilted, shifted, finely sub-sampled) cuts the
same head, and bleeds can ask which tissue lies at a point.

Shells (scalp, skull, the superficial CSF, the cortex) are measured as radial depth below the
outer ellipsoid, which keeps them parallel without a distance transform. Sulci are the zero set of a
smooth random field near the brain surface, which gives a labyrinth of thin CSF clefts lined by
grey matter, as on a real CT.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    SOFT = 2  # scalp, muscle, neck
    BONE = 3
    EXT_CSF = 4  # the thin subarachnoid space over the convexity
    SULCUS = 5
    FISSURE = 6  # interhemispheric and sylvian fissures
    CISTERN = 7  # basal cisterns around the midbrain and pons
    VENTRICLE = 8
    GREY = 9
    WHITE = 10
    DEEP_GREY = 11  # thalami, lentiform and caudate nuclei
    POSTERIOR_FOSSA = 12  # cerebellum and brainstem
    DURA = 13  # falx and dense venous sinuses (a bright mimic of a bleed)
    CALCIFICATION = 14  # pineal and choroid plexus
    GLOBE = 15
    FOLIA = 16  # CSF between the cerebellar folia (not where the modelled subarachnoid blood goes)
    FALX = 17  # the thin dural fold between the hemispheres


# Where subarachnoid blood can collect.
SUBARACHNOID_SPACES = (Tissue.EXT_CSF, Tissue.SULCUS, Tissue.FISSURE, Tissue.CISTERN)
# Brain tissue an intraparenchymal bleed may replace.
PARENCHYMA = (Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY, Tissue.POSTERIOR_FOSSA, Tissue.SULCUS, Tissue.FOLIA)


@dataclass(frozen=True)
class RandomField:
    """A smooth, unit-variance random field: a sum of plane waves with random directions."""

    omega: np.ndarray  # (n, 3) wave vectors, rad/mm
    phase: np.ndarray  # (n,)

    @classmethod
    def sample(cls, rng: np.random.Generator, n: int, wavelength: float) -> "RandomField":
        directions = rng.normal(size=(n, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        k = 2 * np.pi / (wavelength * rng.uniform(0.75, 1.3, size=(n, 1)))
        return cls(omega=(directions * k).astype(np.float32), phase=rng.uniform(0, 2 * np.pi, n).astype(np.float32))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.shape(x), dtype=np.float32)
        for (wx, wy, wz), ph in zip(self.omega, self.phase):
            out += np.cos(wx * x + wy * y + wz * z + ph)
        return out * np.float32(np.sqrt(2.0 / len(self.phase)))


def ellipsoid_radius(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float, float], axes: tuple[float, float, float]
) -> np.ndarray:
    """Normalised radius: < 1 inside the axis-aligned ellipsoid."""
    return np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2)


def rotated_ellipsoid_radius(
    x: np.ndarray, y: np.ndarray, centre: tuple[float, float, float], z: np.ndarray,
    axes: tuple[float, float, float], angle: float,
) -> np.ndarray:
    """Normalised radius of an ellipsoid turned by `angle` (radians) about the z axis."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - centre[0], y - centre[1]
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2)


@dataclass(frozen=True)
class Geometry:
    """Shell depths at a set of points (all arrays share the points' shape)."""

    r: np.ndarray  # distance from the head centre
    depth_out: np.ndarray  # radial depth below the skin (negative outside the head)
    depth_shell: np.ndarray  # radial depth below the inner table, ignoring the skull base
    depth_in: np.ndarray  # depth inside the cranial cavity (negative outside it, and under its floor)
    floor: np.ndarray  # height of the skull base under the point
    skull_t: np.ndarray  # local skull thickness

    @property
    def cavity(self) -> np.ndarray:
        return self.depth_in >= 0


@dataclass(frozen=True)
class Head:
    """One patient's head; all lengths in mm, all densities in HU."""

    axes: tuple[float, float, float]  # outer skin semi-axes above the centre (left-right, ant-post, up)
    c_low: float  # vertical semi-axis below the centre (the head continues into face and neck)
    scalp: float
    skull: float
    fat: float  # subcutaneous fat layer inside the scalp
    csf: float  # superficial subarachnoid space (grows with atrophy)
    sulcus_depth: float
    sulcus_width: float  # half-width of a sulcus, in units of the sulcal field
    vent_scale: float  # ventricle size (grows with atrophy)
    floor_ant: float  # anterior cranial fossa floor height
    floor_post: float  # posterior fossa floor height
    hu_grey: float
    hu_white: float
    hu_csf: float
    hu_dura: float
    pineal_calc: float  # HU of a calcified pineal, 0 when not calcified
    choroid_calc: float  # HU of calcified choroid plexus, 0 when not calcified
    shape: RandomField = field(repr=False)
    sulci: RandomField = field(repr=False)
    folia: RandomField = field(repr=False)
    mottle: RandomField = field(repr=False)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Head":
        s = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
        atrophy = float(rng.beta(1.6, 3.0))  # 0 young .. 1 very atrophic
        return cls(
            axes=(74 * s * rng.uniform(0.95, 1.05), 94 * s * rng.uniform(0.95, 1.05), 84 * s * rng.uniform(0.95, 1.05)),
            c_low=rng.uniform(120, 160),
            scalp=rng.uniform(4.0, 6.5),
            skull=rng.uniform(6.0, 9.0),
            fat=rng.uniform(1.0, 2.5),
            csf=0.6 + 2.6 * atrophy,
            sulcus_depth=rng.uniform(11, 17),
            sulcus_width=0.05 + 0.22 * atrophy,
            vent_scale=0.75 + 0.9 * atrophy + rng.uniform(-0.1, 0.1),
            floor_ant=rng.uniform(-30, -22),
            floor_post=rng.uniform(-66, -56),
            hu_grey=rng.uniform(36, 42),
            hu_white=rng.uniform(25, 30),
            hu_csf=rng.uniform(2, 10),
            hu_dura=rng.uniform(48, 62),
            pineal_calc=float(rng.uniform(120, 400)) if rng.random() < 0.5 else 0.0,
            choroid_calc=float(rng.uniform(100, 250)) if rng.random() < 0.4 else 0.0,
            shape=RandomField.sample(rng, 8, 120.0),
            sulci=RandomField.sample(rng, 14, 22.0),
            folia=RandomField.sample(rng, 10, 7.0),
            mottle=RandomField.sample(rng, 10, 9.0),
        )

    # -- geometry ---------------------------------------------------------------------------

    def geometry(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Geometry:
        a, b, c = self.axes
        r = np.sqrt(x * x + y * y + z * z) + np.float32(1e-3)
        cz = np.where(z > 0, np.float32(c), np.float32(self.c_low))
        rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / cz) ** 2) + np.float32(1e-6)
        ux, uy, uz = x / r, y / r, z / r
        surface = r / rho
        # A gently irregular head: the bumps matter only near the surface (saves time at the centre).
        near = rho > 0.45
        if near.any():
            i = np.nonzero(near)
            surface[i] *= 1 + 0.018 * self.shape(ux[i] * 60, uy[i] * 60, uz[i] * 60)
        depth_out = surface - r
        # The skull is thin over the temples and thick at the front and back.
        skull_t = self.skull * (0.6 + 0.65 * uy * uy + 0.25 * np.clip(uz, 0, 1))
        depth_shell = depth_out - self.scalp - skull_t
        # Skull base: anterior fossa high, posterior fossa low, middle fossae dipping laterally.
        step = 1 / (1 + np.exp(-(y - 8) / 9))
        floor = self.floor_ant + (self.floor_post - self.floor_ant) * step
        floor = floor - 20 * np.exp(-(((np.abs(x) - 38) / 16) ** 2) - ((y + 15) / 22) ** 2)
        depth_in = np.where(z >= floor, depth_shell, np.minimum(depth_shell, z - floor))
        return Geometry(r=r, depth_out=depth_out, depth_shell=depth_shell, depth_in=depth_in, floor=floor, skull_t=skull_t)

    def inner_radius(self, u: np.ndarray) -> float:
        """Distance from the centre to the inner table of the skull along unit direction u."""
        u = np.asarray(u, dtype=np.float32) / np.linalg.norm(u)
        lo, step = 0.0, 0.5
        for _ in range(2):  # coarse march along the ray, then a fine one across the crossing
            t = lo + step * np.arange(401, dtype=np.float32)
            depth = self.geometry(u[0] * t, u[1] * t, u[2] * t).depth_in
            inside = np.nonzero(depth > 0)[0]
            lo = float(t[inside[-1]]) if inside.size else lo
            step /= 400
        return lo

    # -- tissues ----------------------------------------------------------------------------

    def tissue(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, geo: Geometry | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tissue class and bone density (HU, meaningful where tissue is BONE) at the points."""
        geo = geo or self.geometry(x, y, z)
        t = np.full(np.shape(x), Tissue.AIR, dtype=np.uint8)
        bone_hu = np.zeros(np.shape(x), dtype=np.float32)
        d_out, d_in = geo.depth_out, geo.depth_in

        inside = d_out > 0
        t[inside] = Tissue.SOFT
        t[inside & (d_out > 1.3) & (d_out < 1.3 + self.fat)] = Tissue.FAT
        bone = inside & (d_out > self.scalp) & (d_in < 0)
        t[bone] = Tissue.BONE
        # Tables dense, diploe in between: a profile across the shell thickness.
        i = np.nonzero(bone)
        frac = np.clip((d_out[i] - self.scalp) / geo.skull_t[i], 0, 1)
        bone_hu[i] = 1750 - 1050 * np.sin(np.pi * frac) ** 2 * (0.75 + 0.25 * self.mottle(x[i], y[i], z[i]))

        self._skull_base(x, y, z, geo, t, bone_hu, inside)

        cavity = geo.cavity
        if not cavity.any():
            return t, bone_hu
        idx = np.nonzero(cavity)
        t[idx] = self._brain(x[idx], y[idx], z[idx], d_in[idx], geo.floor[idx])
        return t, bone_hu

    def _skull_base(self, x, y, z, geo: Geometry, t, bone_hu, inside) -> None:
        """Under the cranial floor: a bony plate, petrous bones and clivus, air cells, sinuses,
        orbits, all set in soft tissue (face and neck muscles)."""
        below = inside & (z < geo.floor) & (geo.depth_shell >= 0)
        if not below.any():
            return
        idx = np.nonzero(below)
        xb, yb, zb = x[idx], y[idx], z[idx]
        ax = np.abs(xb)
        m = self.mottle(xb * 1.3, yb * 1.3, zb * 1.3)
        tb = np.full(xb.shape, Tissue.SOFT, dtype=np.uint8)
        plate = zb > geo.floor[idx] - 6 - 3 * m
        petrous = rotated_ellipsoid_radius(ax, yb, (30, 8, -50), zb, (9, 30, 9), 0.8) < 1
        clivus = ellipsoid_radius(xb, yb, zb, (0, -8, -56), (10, 9, 22)) < 1
        tb[plate | petrous | clivus] = Tissue.BONE
        a, b, _ = self.axes
        cells = (ellipsoid_radius(ax, yb, zb, (a - 20, 16, -54), (11, 12, 12)) < 1) & (m > 0.1)
        sinus = (ellipsoid_radius(xb, yb, zb, (0, -(b - 42), -48), (12, 24, 16)) < 1) & (np.abs(m) > 0.15)
        sinus |= ellipsoid_radius(xb, yb, zb, (0, -(b - 66), -52), (13, 10, 10)) < 1  # sphenoid
        sinus |= ellipsoid_radius(ax, yb, zb, (24, -(b - 38), -72), (14, 18, 16)) < 1  # maxillary
        tb[cells | sinus] = Tissue.AIR
        t[idx] = tb
        bone_hu[idx] = np.where(tb == Tissue.BONE, 1000 + 450 * np.clip(m, -1, 1), bone_hu[idx])
        # Orbits lie in front of the skull base: globes in fat, in front of everything else.
        orbit = ellipsoid_radius(np.abs(x), y, z, (31, -(b - 24), -40), (17, 19, 14)) < 1
        orbit &= inside & (z < geo.floor + 4)
        t[orbit] = Tissue.FAT
        globe = orbit & (ellipsoid_radius(np.abs(x), y, z, (31, -(b - 18), -40), (12, 12, 12)) < 1)
        t[globe] = Tissue.GLOBE

    def _brain(self, x, y, z, d_in, floor) -> np.ndarray:
        """Tissue inside the cranial cavity (points given as flat arrays)."""
        t = np.full(x.shape, Tissue.WHITE, dtype=np.uint8)
        vs = self.vent_scale

        # Posterior fossa under the tentorium: a tent highest behind the midbrain, sloping down to
        # the sides and the back; in front it stops at the brainstem's front face.
        ax = np.abs(x)
        tentorium = -8 - 0.3 * ax - 0.25 * np.clip(y - 30, 0, None)
        fossa = (z < tentorium) & (y > 20 + 0.8 * (z + 17) + 0.012 * x * x)
        t[fossa] = Tissue.POSTERIOR_FOSSA
        i = np.nonzero(fossa & (d_in > 2) & (ellipsoid_radius(x, y, z, (0, 14, -44), (14, 14, 30)) > 1))
        if i[0].size:
            folia = np.abs(self.folia(x[i], y[i], z[i])) < 0.07
            t[tuple(a[folia] for a in i)] = Tissue.FOLIA

        # Cortex: grey ribbon under the surface and lining the sulci, which taper with depth.
        above = ~fossa
        depth = d_in - self.csf
        in_band = above & (depth > 0) & (depth < self.sulcus_depth)
        f = np.full(x.shape, np.float32(9.0))
        i = np.nonzero(in_band)
        f[i] = np.abs(self.sulci(x[i], y[i], z[i]))
        width = self.sulcus_width * np.clip(1 - depth / self.sulcus_depth, 0, 1)
        t[above & ((depth < 3.2) | (f < width + 0.25))] = Tissue.GREY
        t[in_band & (f < width)] = Tissue.SULCUS

        # Deep grey nuclei, then the ventricles carved out of them.
        deep = (
            (ellipsoid_radius(ax, y, z, (11, 9, 2), (9.5, 13, 9)) < 1)
            | (rotated_ellipsoid_radius(ax, y, (22, -6, 0), z, (6.5, 15, 10), 0.25) < 1)
            | (ellipsoid_radius(ax, y, z, (10 + 2 * vs, -21, 10), (5, 8, 8)) < 1)
        )
        t[deep] = Tissue.DEEP_GREY
        t[ellipsoid_radius(x, y, z, (0, 12, -44), (13, 12, 24)) < 1] = Tissue.POSTERIOR_FOSSA  # pons
        t[ellipsoid_radius(x, y, z, (0, 8, -17), (12, 12, 9)) < 1] = Tissue.POSTERIOR_FOSSA  # midbrain

        # Basal cisterns: a ring around the midbrain, the suprasellar and the quadrigeminal cisterns.
        ring = (ellipsoid_radius(x, y, z, (0, 8, -17), (16.5, 16.5, 8)) < 1) & (
            ellipsoid_radius(x, y, z, (0, 8, -17), (12, 12, 9)) >= 1
        )
        cistern = ring | (ellipsoid_radius(x, y, z, (0, -10, -22), (12, 9, 5)) < 1)
        cistern |= ellipsoid_radius(x, y, z, (0, 25, -8), (8, 7, 6)) < 1
        cistern |= (ellipsoid_radius(x, y, z, (0, 2, -44), (11, 14, 26)) < 1) & (
            ellipsoid_radius(x, y, z, (0, 12, -44), (13, 12, 24)) >= 1
        )  # prepontine
        t[cistern] = Tissue.CISTERN

        # Fissures: interhemispheric (above the corpus callosum and in front of/behind it), sylvian.
        deep_midline = ellipsoid_radius(x, y, z, (0, 2, 2), (24, 44, 24)) < 1
        fissure_w = 0.45 + 0.5 * self.csf
        inter = above & (ax < fissure_w) & ~deep_midline & (z > floor + 8)
        t[inter] = Tissue.FISSURE
        t[inter & (ax < 0.35) & (d_in > 1.5)] = Tissue.FALX
        bend = -8 + 0.45 * z + 0.25 * (ax - 30) + 3 * self.folia(x * 0.3, y * 0.3, z * 0.3)
        sylvian = (ax > 30) & (np.abs(y - bend) < 0.7 + 0.4 * self.csf) & (z > -34) & (z < 4) & (d_in < 24)
        t[sylvian & above] = Tissue.FISSURE

        # Ventricles: frontal horns, bodies and atria of the lateral ventricles, the third and fourth.
        lateral = (
            (rotated_ellipsoid_radius(ax, y, (8, -18, 12), z, (4.5 * vs, 13, 8.5 * vs), 0.45) < 1)
            | (ellipsoid_radius(ax, y, z, (5 + 2.5 * vs, 5, 18), (3.5 * vs, 22, 6 * vs)) < 1)
            | (rotated_ellipsoid_radius(ax, y, (15, 27, 10), z, (6 * vs, 12, 8 * vs), -0.5) < 1)
            | (ellipsoid_radius(ax, y, z, (29, 0, -16), (2.5 * vs, 12, 3.5 * vs)) < 1)
        ) & (ax > 1.2)
        third = ellipsoid_radius(x, y, z, (0, 4, -2), (0.6 + 1.5 * vs, 13, 8)) < 1
        fourth = ellipsoid_radius(x, y, z, (0, 31, -42), (7, 4, 6)) < 1
        t[lateral | third | fourth] = Tissue.VENTRICLE

        # Superficial CSF and the dense dural venous sinuses along the inner table.
        t[d_in < self.csf] = Tissue.EXT_CSF
        sss = (ax < 4.5 - 0.9 * d_in) & (z > 5) & (y > -70) & (d_in < 5)
        transverse = (np.abs(z - (tentorium + 2)) < 3) & (y > 45) & (ax > 8) & (d_in < 4)
        t[sss | transverse] = Tissue.DURA

        if self.pineal_calc:
            t[ellipsoid_radius(x, y, z, (0, 22, -3), (2.5, 2.5, 2.5)) < 1] = Tissue.CALCIFICATION
        if self.choroid_calc:
            t[ellipsoid_radius(ax, y, z, (16, 28, 10), (2.2, 2.8, 2.2)) < 1] = Tissue.CALCIFICATION
        return t

    def hu_of(self, t: np.ndarray, bone_hu: np.ndarray) -> np.ndarray:
        """Mean density of each tissue (noise and blur are added later)."""
        lut = np.zeros(len(Tissue), dtype=np.float32)
        lut[Tissue.AIR] = -1000
        lut[Tissue.FAT] = -90
        lut[Tissue.SOFT] = 42
        lut[[Tissue.EXT_CSF, Tissue.SULCUS, Tissue.FISSURE, Tissue.CISTERN, Tissue.VENTRICLE, Tissue.FOLIA]] = self.hu_csf
        lut[Tissue.GREY] = self.hu_grey
        lut[Tissue.WHITE] = self.hu_white
        lut[Tissue.DEEP_GREY] = self.hu_grey - 5
        lut[Tissue.POSTERIOR_FOSSA] = (self.hu_grey + self.hu_white) / 2 + 1
        lut[Tissue.DURA] = self.hu_dura
        lut[Tissue.FALX] = (self.hu_dura + self.hu_grey) / 2
        lut[Tissue.CALCIFICATION] = max(self.pineal_calc, self.choroid_calc)
        lut[Tissue.GLOBE] = 12
        hu = lut[t]
        return np.where(t == Tissue.BONE, bone_hu, hu)
