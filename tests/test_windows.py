"""Window presets and combinations against a per-pixel computation written out independently."""
from __future__ import annotations

import math

import numpy as np
import pytest

from features.windows import (
    COMBINATIONS,
    HEADER,
    PRESETS,
    apply_combination,
    combo,
    get_combination,
    list_combinations,
    n_channels,
    window_linear,
    window_sigmoid,
)

# The presets, written here rather than read from the module.
REQUIRED_PRESETS = {"brain": (40, 80), "subdural": (80, 200), "bone": (600, 2800), "soft": (40, 380)}


def pixel_linear(hu: float, center: float, width: float) -> float:
    low, high = center - width / 2, center + width / 2
    if hu <= low:
        return 0.0
    if hu >= high:
        return 1.0
    return (hu - low) / width


def pixel_sigmoid(hu: float, center: float, width: float) -> float:
    # Equals 1/255 at center - width/2 and 254/255 at center + width/2.
    gain = 2 * math.log(254) / width
    return 1 / (1 + math.exp(-gain * (hu - center)))


def test_required_presets_and_combinations():
    for name, (c, w) in REQUIRED_PRESETS.items():
        assert (PRESETS[name].center, PRESETS[name].width) == (c, w)
    names = list_combinations()
    assert names == sorted(COMBINATIONS)
    assert {"bsb", "bss", "brain3", "meta3", "bsb_sigmoid"} <= set(names)
    assert [(ch.window, ch.offset) for ch in COMBINATIONS["bsb"].channels] == [("brain", 0), ("subdural", 0), ("bone", 0)]
    assert [(ch.window, ch.offset) for ch in COMBINATIONS["bss"].channels] == [("brain", 0), ("subdural", 0), ("soft", 0)]
    assert [(ch.window, ch.offset) for ch in COMBINATIONS["brain3"].channels] == [("brain", -1), ("brain", 0), ("brain", 1)]
    assert [(ch.window, ch.offset) for ch in COMBINATIONS["meta3"].channels] == [(HEADER, -1), (HEADER, 0), (HEADER, 1)]
    assert COMBINATIONS["bsb_sigmoid"].transform == "sigmoid"
    assert n_channels("bsb") == 3 and n_channels("bsb3") == 9 and n_channels("brain") == 1
    assert COMBINATIONS["bsb"].offsets == (0,) and COMBINATIONS["bsb3"].offsets == (-1, 0, 1)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="known: brain, brain3, bsb"):
        n_channels("nope")
    with pytest.raises(ValueError, match="brain"):
        combo("brian")
    with pytest.raises(ValueError, match="transform"):
        combo("brain", transform="cubic")


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_every_combination_matches_a_per_pixel_loop(name):
    comb = COMBINATIONS[name]
    rng = np.random.default_rng(1)
    k, h, w = len(comb.offsets), 6, 7
    # HU over the full CT range, plus every window's edges exactly.
    slices = rng.uniform(-1100, 3100, size=(k, h, w)).astype(np.float32)
    edges = [v for p in PRESETS.values() for v in (p.center - p.width / 2, p.center, p.center + p.width / 2)]
    slices.reshape(k, -1)[:, : len(edges)] = edges[: h * w]
    header = np.array([[35.0 + 10 * i, 90.0 + 20 * i] for i in range(k)], dtype=np.float32)
    out = apply_combination(comb, slices, header)
    assert out.shape == (len(comb), h, w) and out.dtype == np.float32
    pixel = pixel_sigmoid if comb.transform == "sigmoid" else pixel_linear
    for c, channel in enumerate(comb.channels):
        s = comb.offsets.index(channel.offset)
        center, width = (header[s] if channel.window == HEADER else
                         (PRESETS[channel.window].center, PRESETS[channel.window].width))
        for y in range(h):
            for x in range(w):
                assert out[c, y, x] == pytest.approx(pixel(float(slices[s, y, x]), center, width), abs=2e-6)
    # The channels-last layout gives the same numbers.
    cl = apply_combination(comb, np.ascontiguousarray(slices.transpose(1, 2, 0)), header, channels_last=True)
    np.testing.assert_array_equal(cl.transpose(2, 0, 1), out)


def test_sigmoid_edges_and_linear_clip():
    hu = np.array([-10.0, 0.0, 40.0, 80.0, 90.0], np.float32)  # brain window spans 0..80
    np.testing.assert_allclose(window_linear(hu, 40, 80), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(window_sigmoid(hu[1:4], 40, 80), [1 / 255, 0.5, 254 / 255], rtol=1e-5)


def test_header_window_falls_back_to_brain_when_unusable():
    hu = np.linspace(-50, 150, 20, dtype=np.float32).reshape(1, 4, 5)
    brain = apply_combination("brain", hu)
    for bad in ([np.nan, 80.0], [40.0, 0.0], [40.0, np.nan]):
        np.testing.assert_array_equal(apply_combination("header", hu, np.array([bad], np.float32)), brain)
    with pytest.raises(ValueError, match="header_windows"):
        apply_combination("meta3", np.zeros((3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="3 slices"):
        apply_combination("brain3", np.zeros((1, 2, 2), np.float32))


def test_a_new_combination_is_one_line_of_data(monkeypatch):
    monkeypatch.setitem(COMBINATIONS, "bone_next2", combo("bone@+2", "brain"))
    assert n_channels("bone_next2") == 2 and "bone_next2" in list_combinations()
    comb = get_combination("bone_next2")
    assert comb.offsets == (0, 2)
    slices = np.stack([np.full((2, 2), 40.0), np.full((2, 2), 600.0)]).astype(np.float32)
    out = apply_combination("bone_next2", slices)
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 0.5])  # bone of slice +2, brain of slice 0
