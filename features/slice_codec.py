"""How one cached slice is stored: int16 HU, raw or compressed losslessly with zstd.

``zstd`` splits the little-endian int16 pixels into a plane of low bytes and a plane of high bytes
(HU fit in about 12 bits, so the high plane is nearly constant) and compresses that with zstd at
level 3. On real RSNA slices this takes about 0.4 of the raw bytes and decodes a 256 px slice in
about 0.15 ms (measured with ``python -m features.bench``; see the README). A blob that would not
be smaller than the raw slice is stored raw: a stored length equal to the raw size means raw.
"""
from __future__ import annotations

import os

import numpy as np

CODECS = ("zstd", "raw")
DEFAULT_CODEC = "zstd"
ZSTD_LEVEL = 3
# Share of the raw bytes a slice is expected to take: above what we measured on real slices
# (0.34-0.42), as CT with less air around the head compresses less.
EXPECTED_RATIO = {"zstd": 0.5, "raw": 1.0}
PIXEL = np.dtype("<i2")

_zstd: dict[str, object] = {}  # this process's (de)compressor, keyed by pid: never shared over fork


def _get(kind: str):
    import zstandard

    key = f"{kind}-{os.getpid()}"
    if key not in _zstd:
        _zstd[key] = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if kind == "c" else zstandard.ZstdDecompressor()
    return _zstd[key]


def raw_bytes(size: int) -> int:
    return size * size * PIXEL.itemsize


def encode(stored: np.ndarray, codec: str) -> bytes:
    """The bytes kept for one size x size int16 slice."""
    raw = np.ascontiguousarray(stored, dtype=PIXEL)
    if codec == "raw":
        return raw.tobytes()
    if codec != "zstd":
        raise ValueError(f"unknown cache codec {codec!r}; one of {', '.join(CODECS)}")
    planes = np.ascontiguousarray(raw.view(np.uint8).reshape(-1, 2).T)  # low bytes, then high bytes
    blob = _get("c").compress(planes.tobytes())
    return blob if len(blob) < raw.nbytes else raw.tobytes()


def decode(blob: bytes | memoryview | np.ndarray, size: int) -> np.ndarray:
    """size x size int16 from what :func:`encode` kept (the codec is told by the length)."""
    n = size * size
    if len(blob) == 2 * n:
        return np.frombuffer(blob, dtype=PIXEL).reshape(size, size)
    planes = np.frombuffer(_get("d").decompress(blob), dtype=np.uint8)
    out = np.empty(2 * n, dtype=np.uint8)
    out[0::2] = planes[:n]
    out[1::2] = planes[n:]
    return out.view(PIXEL).reshape(size, size)
