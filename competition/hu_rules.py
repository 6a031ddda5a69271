"""Two CT conventions real exports differ on, decided once for the whole pipeline.

- Pixel padding (PixelPaddingValue 0028,0120 and PixelPaddingRangeLimit 0028,0121): the stored
  values the scanner wrote outside the field of view. They are not tissue (63536 in a 12-bit
  unsigned file reads +1,072 HU), so they become air, ``AIR_HU``, before any window. The values are
  compared with the stored words as written (a 12-bit file may carry 63536 in its high bits) and,
  for decoders that already masked the words to BitsStored, with the value masked the same way.
- Missing RescaleSlope / RescaleIntercept (required for CT): slope 1 where only the slope is
  missing; without the intercept, signed pixels are taken as HU (air reads -1000 already) and
  unsigned pixels in the unsigned CT range 0..4095 (air near 0) get the usual -1024; any other
  unsigned file cannot be told apart and is refused with the reason. Each case adds a note.
"""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

AIR_HU = -1000.0  # below every window the project uses (the widest, bone 600/2800, starts at -800)
UNSIGNED_CT_MAX = 4095  # 12-bit unsigned CT: stored 0..4095 for -1024..3071 HU
UNSIGNED_AIR_MAX = 200  # air of an unsigned CT without intercept stores about 0..30


def _as_int(value: object) -> int | None:
    """A padding tag's value as an int (pydicom gives an int, or a list when it is multi-valued)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None  # type: ignore[index,arg-type]
    try:
        return None if value is None else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _in_bits(value: int, bits: int, signed: bool) -> int:
    """``value`` as a ``bits``-wide stored value (masked, sign-extended when signed)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if signed and value >= 1 << (bits - 1) else value


def padding_mask(ds: Dataset, values: np.ndarray, words: np.ndarray | None) -> tuple[np.ndarray | None, str]:
    """The padded pixels (bool, or None when the file declares no padding) and how they were found.

    ``values``: the stored values after masking to BitsStored; ``words``: the 16-bit words as
    written, when the reader has them (native files)."""
    pad = _as_int(ds.get("PixelPaddingValue"))
    if pad is None:
        return None, ""
    limit = _as_int(ds.get("PixelPaddingRangeLimit"))
    bits = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    allocated = int(ds.get("BitsAllocated", 16) or 16)

    def inside(array: np.ndarray, width: int) -> np.ndarray:
        a = _in_bits(pad, width, signed)
        b = a if limit is None else _in_bits(limit, width, signed)
        lo, hi = min(a, b), max(a, b)
        return (array >= lo) & (array <= hi)

    mask = inside(values, bits)
    if words is not None and bits < allocated:  # the high bits carry the padding: compare whole words
        mask = inside(words, allocated)
    return mask, padding_what(ds)


def padding_what(ds: Dataset) -> str:
    """The padding tags as the notes name them ("" when the file declares none)."""
    pad, limit = _as_int(ds.get("PixelPaddingValue")), _as_int(ds.get("PixelPaddingRangeLimit"))
    if pad is None:
        return ""
    return f"PixelPaddingValue {pad}" + ("" if limit is None else f" to PixelPaddingRangeLimit {limit}")


def padding_note(what: str) -> str:
    return f"pixel padding ({what}) set to air, {AIR_HU:.0f} HU"


def rescale(slope: float | None, intercept: float | None, signed: bool, values: np.ndarray,
            ct: bool = True) -> tuple[float, float, str | None]:
    """(slope, intercept, note) from the header's slope and intercept (None where missing) or the
    convention above, with a note saying which. ``values``: the stored values that are not padding;
    ``ct``: False for another modality, whose missing tags mean the identity as in pydicom.

    Raises ValueError with the reason when no convention applies."""
    if not ct:
        return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept), None
    if intercept is not None:
        note = None if slope is not None else "no RescaleSlope (required for CT): slope 1 assumed"
        return (1.0 if slope is None else slope), intercept, note
    missing = "RescaleIntercept" if slope is not None else "RescaleSlope/RescaleIntercept"
    slope = 1.0 if slope is None else slope
    if signed:
        return slope, 0.0, f"no {missing} (required for CT): signed pixels taken as HU (intercept 0)"
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if high <= UNSIGNED_CT_MAX and low <= UNSIGNED_AIR_MAX:
        return slope, -1024.0, (f"no {missing} (required for CT): unsigned pixels {low}..{high} are in the unsigned "
                                f"CT range 0..{UNSIGNED_CT_MAX}, intercept -1024 applied (air 0 -> -1024 HU)")
    raise ValueError(f"no {missing} (required for CT) and unsigned pixels {low}..{high} are not in the unsigned CT "
                     f"range 0..{UNSIGNED_CT_MAX} with air near 0: HU cannot be told; export the series with its "
                     f"rescale tags")
