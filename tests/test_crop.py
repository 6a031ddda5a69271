"""The head's square box and the slice codec: geometry against brute force, exact round trips."""
from __future__ import annotations

import numpy as np
import pytest

from features.crop import BODY_HU, cut_square, head_extent, square_box, to_original, union
from features.slice_codec import CODECS, decode, encode


def phantom(shape, centre, radii, table_row=None) -> np.ndarray:
    """Air, an elliptic head of 40 HU, and optionally a thin table (200 HU) across the slice."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1] = 40.0
    if table_row is not None:
        hu[table_row : table_row + 2, :] = 200.0
    return hu


def test_head_extent_is_the_largest_region_not_the_table():
    hu = phantom((64, 48), (28, 22), (15, 12), table_row=58)
    ys, xs = np.nonzero(np.abs(hu - 40) < 1)
    assert head_extent(hu) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    assert head_extent(np.full((8, 8), -1000.0)) is None
    assert BODY_HU < -100  # fat (-100 HU) counts as body


def test_square_box_pads_a_non_square_slice_and_keeps_the_margin():
    assert square_box(None, (40, 20)).tolist() == [0, -10, 40, 30]  # centred, padded, not stretched
    box = square_box((10, 8, 50, 40), (64, 48))  # margin round(0.02 * 64) = 1 px
    y0, x0, y1, x1 = box
    assert y1 - y0 == x1 - x0 == 42 and (y0, y1) == (9, 51) and x0 <= 7 and x1 >= 41
    assert square_box((30, 30, 34, 34), (64, 64)).tolist()[2] - square_box((30, 30, 34, 34), (64, 64)).tolist()[0] == 32  # zoom <= 2x
    assert union([None, (1, 2, 3, 4), (0, 5, 2, 9)]) == (0, 2, 3, 9) and union([None]) is None


def test_cut_square_and_to_original_round_trip():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 100, (30, 20)).astype(np.float32)
    box = np.array([-4, -9, 34, 29])
    square = cut_square(hu, box, fill=-1024)
    assert square.shape == (38, 38)
    padded = np.pad(hu, ((4, 4), (9, 9)), constant_values=-1024)  # brute force
    np.testing.assert_array_equal(square, padded)
    np.testing.assert_array_equal(to_original(square, box, hu.shape), hu)  # same size: exact
    inner = np.array([5, 3, 15, 13])
    np.testing.assert_array_equal(to_original(cut_square(hu, inner, 0), inner, hu.shape, fill=-7)[5:15, 3:13], hu[5:15, 3:13])
    assert (to_original(cut_square(hu, inner, 0), inner, hu.shape, fill=-7)[:5] == -7).all()


@pytest.mark.parametrize("codec", CODECS)
def test_slice_codec_round_trips_exactly(codec):
    rng = np.random.default_rng(1)
    ct = np.full((64, 64), -1024, np.int16)
    ct[8:56, 8:56] = rng.integers(-100, 1500, (48, 48))
    ct[0, :3] = [32767, -32768, 0]
    for image in (ct, rng.integers(-32768, 32767, (64, 64)).astype(np.int16)):
        blob = encode(image, codec)
        np.testing.assert_array_equal(decode(blob, 64), image)
        assert len(blob) <= image.nbytes
        for dtype in (np.float32, np.int16):  # decoded straight into the caller's array
            out = np.zeros((64, 64), dtype)
            assert decode(blob, 64, out) is out
            np.testing.assert_array_equal(out, image.astype(dtype))
    if codec != "raw":
        assert len(encode(ct, codec)) < 0.6 * ct.nbytes  # air (and 11-bit noise's high bytes) compress
        assert len(encode(rng.integers(-32768, 32767, (64, 64)).astype(np.int16), codec)) == 64 * 64 * 2  # stored raw
    with pytest.raises(ValueError, match="unknown cache codec"):
        encode(ct, "png")


def test_head_extent_of_a_large_slice_is_found_on_a_grid_but_holds_the_head():
    # 512 px: found on every 4th pixel, widened so that it still holds every head pixel.
    hu = phantom((512, 400), (250, 190), (151, 117), table_row=480)
    ys, xs = np.nonzero(np.abs(hu - 40) < 1)
    y0, x0, y1, x1 = head_extent(hu)
    assert y0 <= ys.min() and x0 <= xs.min() and y1 >= ys.max() + 1 and x1 >= xs.max() + 1
    assert ys.min() - y0 < 4 and xs.min() - x0 < 4 and y1 - ys.max() <= 4 and x1 - xs.max() <= 4 and y1 < 480
