"""How one cached slice is stored: int16 HU, raw or compressed losslessly (lz4 or zstd).

The compressed codecs split the little-endian int16 pixels into a plane of low bytes and a plane
of high bytes (HU fit in about 12 bits, so the high plane is nearly constant) and compress that.
On real RSNA slices (``python -m features.bench``, README) lz4 keeps about half of the raw bytes
and decodes fastest; zstd (level 3) keeps about 0.4 and decodes about 3x slower. Decoding writes
straight into the caller's array (int16 or float32), so the planes are never put back together
as int16 first. A blob that would not be smaller than the raw slice is stored raw: a stored length
equal to the raw size means raw.
"""
from __future__ import annotations

import os

import numpy as np

CODECS = ("lz4", "zstd", "raw")
DEFAULT_CODEC = "lz4"
ZSTD_LEVEL = 3
# Share of the raw bytes a slice is expected to take: above what we measured on real slices
# (lz4 0.46-0.52, zstd 0.34-0.42), as CT with less air around the head compresses less.
EXPECTED_RATIO = {"lz4": 0.6, "zstd": 0.5, "raw": 1.0}
PIXEL = np.dtype("<i2")

_zstd: dict[str, object] = {}  # this process's zstd (de)compressor, keyed by pid: never shared over fork


def _zstd_get(kind: str):
    import zstandard

    key = f"{kind}-{os.getpid()}"
    if key not in _zstd:
        _zstd[key] = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if kind == "c" else zstandard.ZstdDecompressor()
    return _zstd[key]


def raw_bytes(size: int) -> int:
    return size * size * PIXEL.itemsize


def _compress(planes: bytes, codec: str) -> bytes:
    if codec == "lz4":
        import lz4.block

        return b"L" + lz4.block.compress(planes, store_size=True)
    return b"Z" + _zstd_get("c").compress(planes)


def _decompress(blob: bytes | memoryview | np.ndarray) -> bytes:
    tag, body = bytes(blob[:1]), memoryview(blob)[1:]
    if tag == b"L":
        import lz4.block

        return lz4.block.decompress(body)
    return _zstd_get("d").decompress(body)


def encode(stored: np.ndarray, codec: str) -> bytes:
    """The bytes kept for one size x size int16 slice (a one-byte codec tag, then the codec's)."""
    raw = np.ascontiguousarray(stored, dtype=PIXEL)
    if codec == "raw":
        return raw.tobytes()
    if codec not in CODECS:
        raise ValueError(f"unknown cache codec {codec!r}; one of {', '.join(CODECS)}")
    planes = np.ascontiguousarray(raw.view(np.uint8).reshape(-1, 2).T)  # low bytes, then high bytes
    blob = _compress(planes.tobytes(), codec)
    return blob if len(blob) < raw.nbytes else raw.tobytes()


def decode(blob: bytes | memoryview | np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """size x size pixels from what :func:`encode` kept, into ``out`` (any numeric dtype; int16 by
    default)."""
    n = size * size
    out = np.empty((size, size), dtype=PIXEL) if out is None else out
    if len(blob) == 2 * n:
        out[...] = np.frombuffer(blob, dtype=PIXEL).reshape(size, size)
        return out
    planes = np.frombuffer(_decompress(blob), dtype=np.uint8)
    flat = out.reshape(n)
    np.multiply(planes[n:].view(np.int8), np.int16(256), out=flat, casting="unsafe")  # the signed high byte
    np.add(flat, planes[:n], out=flat, casting="unsafe")
    return out
