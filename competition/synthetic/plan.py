"""The dataset plan: every patient, study, slice id, scanner setting, quirk and bleed, from one seed.

The plan is drawn in one process from one random stream, so a seed fixes the dataset whatever
the number of workers; rendering a study needs only its `StudyPlan`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from competition.constants import SUBTYPES
from competition.synthetic.bleeds import Bleed, sample_bleed
from competition.synthetic.phantom import Head


@dataclass(frozen=True)
class Knobs:
    """Difficulty and prevalence settings (the defaults aim at the real data's prevalence)."""

    bleed_scale: float = 1.0  # multiplies every bleed's size
    bleed_contrast: float = 1.0  # multiplies a bleed's excess density over brain (about 35 HU)
    noise_hu: float = 5.0  # standard deviation of the scanner noise
    positive_rate: float = 0.37  # share of studies with at least one bleed
    min_area_mm2: float = 6.0  # a slice shows a bleed when at least this much of it is blood
    test_fraction: float = 0.15  # share of patients in the test set (stratified, see split_patients)
    followup_rate: float = 0.16  # chance that a patient has another study (repeatable)


@dataclass(frozen=True)
class Preset:
    n_patients: int
    size: int
    slices: tuple[int, int] = (20, 40)
    test_fraction: float | None = None  # overrides Knobs.test_fraction


PRESETS: dict[str, Preset] = {
    # 110 patients, 30% of them test: about 3,900 slices, 1,100+ of them test (enough to tell models apart).
    "demo": Preset(n_patients=110, size=256, test_fraction=0.3),
    "tiny": Preset(n_patients=8, size=64, slices=(20, 24), test_fraction=0.25),
}

# Primary subtype of a positive study, and which others come along with it (chance each).
# Tuned so that slice-level rates land near the real data's (epidural 0.4%, intraparenchymal
# 4.8%, intraventricular 3.5%, subarachnoid 4.7%, subdural 6.3%, any 14%): rendering the labels
# of 720 studies (seed 5, `render.study_areas`) gave 0.43%, 4.6%, 3.8%, 4.3%, 6.0%, any 15.3%.
# A 100-patient demo varies around these by a few points (whole studies are positive or not).
PRIMARY = {"epidural": 0.04, "intraparenchymal": 0.21, "intraventricular": 0.35, "subarachnoid": 0.19, "subdural": 0.21}
COMPANIONS = {
    "epidural": {"subdural": 0.35, "subarachnoid": 0.2, "intraparenchymal": 0.15},
    "intraparenchymal": {"intraventricular": 0.45, "subarachnoid": 0.15, "subdural": 0.1},
    "intraventricular": {"intraparenchymal": 0.45, "subarachnoid": 0.2},
    "subarachnoid": {"intraventricular": 0.3, "subdural": 0.3, "intraparenchymal": 0.2},
    "subdural": {"subarachnoid": 0.2, "intraparenchymal": 0.15, "epidural": 0.02},
}

# (WindowCenter, WindowWidth) as the scanners wrote them: mostly multi-valued, zero-padded strings.
WINDOWS: list[tuple[list[str], list[str], float]] = [
    (["00040", "00040"], ["00080", "00080"], 0.55),
    (["00036", "00036"], ["00080", "00080"], 0.15),
    (["00040", "00040"], ["00150", "00150"], 0.08),
    (["40"], ["80"], 0.12),
    (["30"], ["80"], 0.05),
    (["00035", "00700"], ["00100", "03200"], 0.05),
]


@dataclass
class StudyPlan:
    index: int
    patient_id: str
    study_id: str
    series_id: str
    split: str  # "train" or "test"
    sop_ids: list[str]  # slice k (k=0 lowest) has id sop_ids[k]
    head: Head = field(repr=False)
    pose: np.ndarray = field(repr=False)  # 3x3 rotation, head -> patient axes
    centre: np.ndarray = field(repr=False)  # head centre in patient coordinates, mm
    tilt_deg: float = 0.0  # gantry tilt
    spacing: float = 5.0  # between slices along the table, mm
    z0: float = 0.0  # table position of slice 0
    size: int = 256  # rows = columns
    pixel_spacing: float = 1.0
    image_centre: tuple[float, float] = (0.0, 0.0)  # patient x, y of the image centre
    window: tuple[list[str], list[str]] = (["00040", "00040"], ["00080", "00080"])
    intercept_quirk: bool = False
    truncated_slice: int = -1  # index of the one slice written with truncated pixel data
    bleeds: list[Bleed] = field(default_factory=list)
    knobs: Knobs = field(default_factory=Knobs)
    seed: int = 0

    @property
    def n_slices(self) -> int:
        return len(self.sop_ids)

    @property
    def subtypes(self) -> list[str]:
        return sorted({b.subtype for b in self.bleeds}, key=SUBTYPES.index)


class _Ids:
    """Unique random hex ids of a fixed width, as the competition's (`ID_` + hex)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.used = rng, set()

    def __call__(self, digits: int) -> str:
        while True:
            value = f"ID_{int(self.rng.integers(0, 16**digits)):0{digits}x}"
            if value not in self.used:
                self.used.add(value)
                return value


def _rotation(yaw: float, roll: float, pitch: float) -> np.ndarray:
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _subtype_set(rng: np.random.Generator, positive_rate: float) -> list[str]:
    if rng.random() >= positive_rate:
        return []
    names = list(PRIMARY)
    weights = np.array([PRIMARY[n] for n in names])
    primary = str(rng.choice(names, p=weights / weights.sum()))
    chosen = {primary} | {other for other, p in COMPANIONS[primary].items() if rng.random() < p}
    return sorted(chosen, key=SUBTYPES.index)


def _bleeds_for(subtypes: list[str], head: Head, rng: np.random.Generator, knobs: Knobs) -> list[Bleed]:
    """Bleeds of the given subtypes. The most common subtype of the set is placed first and the
    others near it (same side, same region), as the bleeds of one injury are."""
    bleeds: list[Bleed] = []
    order = sorted(subtypes, key=lambda t: t != max(subtypes, key=lambda s: PRIMARY[s]))
    for subtype in order:
        count = 1 + int(subtype in ("subdural", "subarachnoid", "intraparenchymal") and rng.random() < 0.15)
        for _ in range(count):
            hu = 35 + knobs.bleed_contrast * (rng.uniform(55, 85) - 35)
            near = np.asarray(bleeds[0].centre) if bleeds else None
            bleeds.append(sample_bleed(subtype, head, rng, scale=knobs.bleed_scale, hu=float(hu), near=near))
    return bleeds


def make_plan(
    n_patients: int, size: int, seed: int, knobs: Knobs, slices: tuple[int, int] = (20, 40)
) -> list[StudyPlan]:
    """Every study of the dataset, deterministic for the arguments."""
    if n_patients < 2:
        raise ValueError(f"n_patients={n_patients}: need at least 2 (one train, one test patient)")
    rng = np.random.default_rng(seed)
    ids = _Ids(rng)
    studies: list[StudyPlan] = []
    subtype_sets: list[list[str]] = []
    for p in range(n_patients):
        patient_id = ids(8)
        head = Head.sample(rng)
        n_studies = 1
        while rng.random() < knobs.followup_rate and n_studies < 4:
            n_studies += 1
        first = _subtype_set(rng, knobs.positive_rate)
        for s in range(n_studies):
            # A follow-up shows the same bleeds (resized, older) or, sometimes, none left.
            subtype_sets.append(first if s == 0 or rng.random() < 0.8 else [])
            tilt = 0.0 if rng.random() < 0.4 else float(rng.uniform(5, 22))
            n = int(rng.integers(slices[0], slices[1] + 1))
            z_lo, z_hi = rng.uniform(-64, -44), head.axes[2] + rng.uniform(-6, 8)
            spacing = float(np.clip((z_hi - z_lo) / n, 3.0, 6.5))
            centre = np.array([rng.uniform(-12, 12), rng.uniform(-30, 30), rng.uniform(-150, 350)])
            z_mid = (z_lo + z_hi) / 2
            fov = rng.uniform(205, 250)
            studies.append(
                StudyPlan(
                    index=len(studies),
                    patient_id=patient_id,
                    study_id=ids(10),
                    series_id=ids(10),
                    split="train",  # set below, once every patient's bleeds are known
                    sop_ids=[ids(9) for _ in range(n)],
                    head=head,
                    pose=_rotation(*np.deg2rad([rng.uniform(-8, 8), rng.uniform(-6, 6), rng.uniform(-10, 15)])),
                    centre=centre,
                    tilt_deg=tilt,
                    spacing=round(spacing, 3),
                    z0=float(centre[2] + z_mid - spacing * (n - 1) / 2),
                    size=size,
                    pixel_spacing=float(np.round(fov / size, 6)),
                    image_centre=(float(centre[0] + rng.uniform(-10, 10)), float(centre[1] + rng.uniform(-12, 12))),
                    window=_window(rng),
                    knobs=knobs,
                    seed=int(rng.integers(0, 2**31)),
                )
            )

    first_sets = {}
    for study, subtypes in zip(studies, subtype_sets):
        first_sets.setdefault(study.patient_id, subtypes)
    test_patients = split_patients(list(first_sets.values()), knobs.test_fraction, np.random.default_rng([seed, 2]))
    test_ids = {pid for pid, is_test in zip(first_sets, test_patients) if is_test}
    for study in studies:
        study.split = "test" if study.patient_id in test_ids else "train"
    _ensure_every_subtype(studies, subtype_sets, rng)
    # Bleed geometry, per patient: follow-ups reuse the first study's bleeds, resized and older.
    first_bleeds: dict[str, list[Bleed]] = {}
    for study, subtypes in zip(studies, subtype_sets):
        if study.patient_id not in first_bleeds:
            study.bleeds = _bleeds_for(subtypes, study.head, rng, knobs)
            first_bleeds[study.patient_id] = study.bleeds
        elif subtypes:
            base = first_bleeds[study.patient_id]
            if not base or {b.subtype for b in base} != set(subtypes):
                study.bleeds = _bleeds_for(subtypes, study.head, rng, knobs)
            else:
                f = float(rng.uniform(0.6, 1.15))
                study.bleeds = [b.scaled(f, max(52.0, b.hu - rng.uniform(0, 12))) for b in base]
    _assign_quirks(studies, rng)
    return studies


def stratum(subtypes: list[str]) -> str:
    """A patient's stratum: negative, or the rarest subtype of its first study (rare ones matter most)."""
    return min(subtypes, key=lambda t: PRIMARY[t]) if subtypes else "negative"


def split_patients(subtype_sets: list[list[str]], test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which patients are test (bool per patient), stratified on positivity and subtype.

    Patients are ordered by stratum, shuffled within it, and every 1/test_fraction-th one along
    that order is test (from a random start): each stratum gets its share to within one patient,
    and the test set has round(test_fraction * n) patients, at least one and never all.
    """
    n = len(subtype_sets)
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    keys = [stratum(s) for s in subtype_sets]
    order = sorted(range(n), key=lambda i: (["negative", *PRIMARY].index(keys[i]), rng.random()))
    start = rng.random()
    picks = np.floor(start + np.arange(n + 1) * n_test / n)
    is_test = np.zeros(n, bool)
    is_test[[order[k] for k in range(n) if picks[k + 1] > picks[k]]] = True
    return is_test


def _window(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    p = np.array([w[2] for w in WINDOWS])
    centre, width, _ = WINDOWS[int(rng.choice(len(WINDOWS), p=p / p.sum()))]
    return list(centre), list(width)


def _ensure_every_subtype(studies: list[StudyPlan], subtype_sets: list[list[str]], rng: np.random.Generator) -> None:
    """Every subtype appears in train, and in test when it has two studies or more (small datasets)."""
    for split in ("train", "test"):
        members = [i for i, s in enumerate(studies) if s.split == split]
        if split == "test" and len(members) < 2:
            continue
        for subtype in SUBTYPES:
            if not any(subtype in subtype_sets[i] for i in members):
                i = int(rng.choice(members))
                subtype_sets[i] = sorted(set(subtype_sets[i]) | {subtype}, key=SUBTYPES.index)


def _assign_quirks(studies: list[StudyPlan], rng: np.random.Generator) -> None:
    """The real data's oddities: the 12-bit intercept quirk, an odd image size, one truncated file."""
    for split, share_quirk, share_odd in (("train", 0.04, 0.02), ("test", 0.04, 0.02)):
        members = [s for s in studies if s.split == split]
        order = [members[i] for i in rng.permutation(len(members))]
        n_quirk = max(1, round(share_quirk * len(members)))
        n_odd = max(1, round(share_odd * len(members))) if (split == "train" or len(members) >= 10) else 0
        for s in order[:n_quirk]:
            s.intercept_quirk = True
        for s in order[n_quirk:n_quirk + n_odd]:
            s.size = s.size + s.size // 4
            s.pixel_spacing = float(np.round(s.pixel_spacing * 0.8, 6))  # same field of view, finer pixels
        if split == "train":
            plain = order[n_quirk + n_odd:] or order
            victim = plain[0]
            victim.truncated_slice = int(rng.integers(0, victim.n_slices))
