"""Intracranial bleeds as 3-D objects in head coordinates, one class per subtype.

Each subtype is told apart the way a radiologist tells it apart, by place and shape:
- epidural: a biconvex lens pressed against the inner table, thick and short;
- subdural: a crescent hugging the inner table over a long stretch, thin, stopping at the midline;
- subarachnoid: blood replacing CSF in the sulci, fissures and basal cisterns (thin bright lines);
- intraparenchymal: an irregular blob inside the brain, with a dark rim of oedema;
- intraventricular: blood inside the ventricles, layering at the back or casting a ventricle.
A bleed answers which points it fills (`mask`); the renderer averages that over the slice thickness,
so a bleed tapers in contrast as well as extent at its first and last slices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from competition.synthetic.phantom import PARENCHYMA, SUBARACHNOID_SPACES, Geometry, Head, RandomField, Tissue


@dataclass(frozen=True)
class Bleed:
    subtype: str
    variant: str
    centre: tuple[float, float, float]  # head coordinates, mm; the bounding sphere's centre
    extent: float  # bounding sphere radius, mm
    hu: float
    needs_tissue = False

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, head: Head, geo: Geometry, tissue: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def halo(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray | None:
        """Points of surrounding oedema (darker, not bleed), or None."""
        return None

    def scaled(self, factor: float, hu: float) -> "Bleed":
        """The same bleed at a follow-up scan: resized about its centre, older (less dense)."""
        raise NotImplementedError


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _chord(x, y, z, u: tuple[float, float, float], radius: float) -> np.ndarray:
    """Distance along the skull surface (chord approximation) from the point's direction to u."""
    r = np.sqrt(x * x + y * y + z * z) + np.float32(1e-3)
    return np.sqrt((x / r - u[0]) ** 2 + (y / r - u[1]) ** 2 + (z / r - u[2]) ** 2) * radius


@dataclass(frozen=True)
class Extra(Bleed):
    """Blood between the skull and the dura (epidural) or under the dura (subdural).

    Thickness below the inner table falls off with the distance along the surface from the
    bleed's centre: a parabola for the epidural lens, a flat-topped profile for the subdural
    crescent, which also stops short of the falx.
    """

    u: tuple[float, float, float] = (1.0, 0.0, 0.0)  # direction of the centre from the head centre
    radius_in: float = 70.0  # inner-table radius along u
    span: float = 25.0  # how far along the surface it reaches
    thickness: float = 10.0
    power: float = 1.0  # profile (1 - (s/span)^2) ** power

    def mask(self, x, y, z, head, geo, tissue):
        s = _chord(x, y, z, self.u, self.radius_in)
        profile = np.clip(1 - (s / self.span) ** 2, 0, 1) ** self.power
        m = geo.cavity & (geo.depth_in < self.thickness * profile) & (s < self.span)
        if self.subtype == "subdural":
            m &= x * np.sign(self.u[0]) > 1.5
        return m

    def scaled(self, factor, hu):
        return _replace(self, span=self.span * factor, thickness=self.thickness * factor, extent=self.extent * factor, hu=hu)


@dataclass(frozen=True)
class Subarachnoid(Bleed):
    """Blood in the CSF spaces within a ball: over the convexity, or around the basal cisterns."""

    radius: float = 30.0
    spaces: tuple[int, ...] = tuple(int(t) for t in SUBARACHNOID_SPACES)
    needs_tissue = True

    def mask(self, x, y, z, head, geo, tissue):
        c = self.centre
        d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        return (d2 < self.radius**2) & np.isin(tissue, self.spaces)

    def scaled(self, factor, hu):
        return _replace(self, radius=self.radius * factor, extent=self.extent * factor, hu=hu)


@dataclass(frozen=True)
class Intraparenchymal(Bleed):
    """An irregular ellipsoidal haematoma in the brain tissue, ringed by oedema."""

    axes: tuple[float, float, float] = (10.0, 10.0, 10.0)
    angle: float = 0.0  # turn about the head's vertical axis
    rim: float = 3.0  # oedema thickness, mm
    wobble: RandomField | None = field(default=None, repr=False)
    needs_tissue = True

    def _rho(self, x, y, z) -> np.ndarray:
        c = self.centre
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        ca, sa = np.cos(self.angle), np.sin(self.angle)
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
        rho = np.sqrt((u / self.axes[0]) ** 2 + (v / self.axes[1]) ** 2 + (dz / self.axes[2]) ** 2)
        if self.wobble is not None:
            n = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-3)
            rho = rho * (1 + 0.18 * self.wobble(dx / n * 30, dy / n * 30, dz / n * 30))
        return rho

    def mask(self, x, y, z, head, geo, tissue):
        return (self._rho(x, y, z) < 1) & np.isin(tissue, [int(t) for t in PARENCHYMA])

    def halo(self, x, y, z):
        rho = self._rho(x, y, z)
        return (rho >= 1) & (rho < 1 + self.rim / min(self.axes))

    def scaled(self, factor, hu):
        return _replace(self, axes=tuple(a * factor for a in self.axes), extent=self.extent * factor, hu=hu)


@dataclass(frozen=True)
class Intraventricular(Bleed):
    """Blood in the ventricles: a cast around a point, or a level layering in the occipital horns."""

    radius: float = 20.0  # cast: ball radius
    level: float = 0.0  # layering: blood where y > level (posterior is dependent in a supine patient)
    side: int = 0  # layering: -1 right, +1 left, 0 both
    needs_tissue = True

    def mask(self, x, y, z, head, geo, tissue):
        m = tissue == Tissue.VENTRICLE
        if self.variant == "layering":
            m &= y > self.level
            if self.side:
                m &= x * self.side > 0
            return m
        c = self.centre
        return m & ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < self.radius**2)

    def scaled(self, factor, hu):
        # A smaller layer sits lower: raise the level (posterior) when it shrinks.
        return _replace(self, radius=self.radius * factor, level=self.level + 8 * (1 - factor), hu=hu)


def _replace(obj, **changes):
    from dataclasses import replace

    return replace(obj, **changes)


# -- sampling -------------------------------------------------------------------------------


def _direction(
    rng: np.random.Generator, min_lateral: float, z_range: tuple[float, float], near: np.ndarray | None = None
) -> np.ndarray:
    """A random unit vector with |x| >= min_lateral and z within z_range, close to `near` if given."""
    for attempt in range(1000):
        if near is not None and np.linalg.norm(near) > 1 and attempt < 200:
            u = _unit(_unit(near) + 0.45 * rng.normal(size=3))
        else:
            u = _unit(rng.normal(size=3))
        if abs(u[0]) >= min_lateral and z_range[0] <= u[2] <= z_range[1]:
            return u
    raise RuntimeError("no direction satisfies the constraints")


def sample_bleed(
    subtype: str, head: Head, rng: np.random.Generator, *, scale: float, hu: float, near: np.ndarray | None = None
) -> Bleed:
    """One bleed of the subtype, placed in this head (towards `near`, a point, when given).
    `scale` multiplies every size."""
    if subtype == "epidural":
        u = _direction(rng, 0.35, (-0.15, 0.65), near)
        r_in = head.inner_radius(u)
        span, thick = rng.uniform(15, 26) * scale, rng.uniform(8, 16) * scale
        centre = tuple(float(v) for v in u * (r_in - thick / 2))
        return Extra("epidural", "lens", centre, span + thick, hu, u=tuple(map(float, u)), radius_in=r_in,
                     span=span, thickness=thick, power=1.0)
    if subtype == "subdural":
        u = _direction(rng, 0.55, (-0.05, 0.7), near)
        r_in = head.inner_radius(u)
        span, thick = rng.uniform(28, 55) * scale, rng.uniform(4, 11) * scale
        centre = tuple(float(v) for v in u * (r_in - thick / 2))
        return Extra("subdural", "crescent", centre, span + thick, hu, u=tuple(map(float, u)), radius_in=r_in,
                     span=span, thickness=thick, power=0.35)
    if subtype == "subarachnoid":
        if rng.random() < (0.5 if near is None else 0.25):
            radius = rng.uniform(28, 45) * scale
            centre = (rng.uniform(-4, 4), rng.uniform(-12, 4), rng.uniform(-24, -10))
            return Subarachnoid("subarachnoid", "basal", centre, radius, hu, radius=radius)
        u = _direction(rng, 0.2, (0.0, 0.85), near)
        r_in = head.inner_radius(u)
        radius = rng.uniform(20, 36) * scale
        centre = tuple(float(v) for v in u * (r_in - 6))
        return Subarachnoid("subarachnoid", "convexity", centre, radius, hu, radius=radius,
                            spaces=(int(Tissue.EXT_CSF), int(Tissue.SULCUS), int(Tissue.FISSURE)))
    if subtype == "intraparenchymal":
        for _ in range(100):
            kind = rng.choice(["deep", "lobar", "cerebellar"], p=[0.45, 0.45, 0.10] if near is None else [0.3, 0.7, 0.0])
            side = rng.choice([-1, 1]) if near is None or abs(near[0]) < 1 else np.sign(near[0])
            if kind == "deep":
                c = np.array([side * rng.uniform(12, 26), rng.uniform(-14, 14), rng.uniform(-4, 10)])
            elif kind == "cerebellar":
                c = np.array([side * rng.uniform(10, 24), rng.uniform(44, 58), rng.uniform(-46, -36)])
            else:
                u = _direction(rng, 0.0, (0.0, 0.8), near)
                c = u * (head.inner_radius(u) - rng.uniform(16, 30))
            t, _ = head.tissue(*(np.array([v], dtype=np.float32) for v in c))
            if t[0] in (Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY, Tissue.POSTERIOR_FOSSA):
                break
        size = rng.uniform(7, 20) * scale * (0.7 if kind == "cerebellar" else 1.0)
        axes = tuple(float(size * rng.uniform(0.7, 1.3)) for _ in range(3))
        return Intraparenchymal("intraparenchymal", str(kind), tuple(map(float, c)), max(axes) * 1.3 + 4, hu,
                                axes=axes, angle=float(rng.uniform(0, np.pi)), rim=float(rng.uniform(1.5, 4.5)),
                                wobble=RandomField.sample(rng, 6, 45.0))
    if subtype == "intraventricular":
        vs = head.vent_scale
        if rng.random() < 0.5:
            level = rng.uniform(12, 26)
            side = int(rng.choice([-1, 0, 0, 1]))
            return Intraventricular("intraventricular", "layering", (side * 16.0, 30.0, 8.0), 28.0, hu,
                                    level=level, side=side)
        side = rng.choice([-1, 1])
        c = rng.choice([0, 1, 2], p=[0.6, 0.25, 0.15])
        centre = [(side * (5 + 2.5 * vs), rng.uniform(-12, 14), 16.0), (0.0, 4.0, -2.0), (0.0, 31.0, -42.0)][c]
        radius = rng.uniform(14, 30) * scale
        return Intraventricular("intraventricular", "cast", tuple(map(float, centre)), radius, hu, radius=radius)
    raise ValueError(f"unknown subtype {subtype!r}")
