"""DICOM -> HU against pydicom's own modality LUT, the 12-bit quirk, odd sizes and broken files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from competition.hu_rules import AIR_HU
from competition.dicom import DicomReadError, first_number, has_12bit_quirk, header_fields, read_dataset, read_hu
from dicom_factory import random_stored, write_ct


@pytest.mark.parametrize(
    "slope, intercept",
    [(1, -1024), ("1", "-1024"), (2, -1000), ("0.5", "-1024.0")],
)
def test_hu_matches_pydicom_modality_lut(tmp_path, slope, intercept):
    rng = np.random.default_rng(0)
    path = write_ct(tmp_path / "ID_000000001.dcm", random_stored(rng), slope=slope, intercept=intercept)
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds)
    got = read_hu(path)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_non_square_non_512(tmp_path):
    rng = np.random.default_rng(1)
    path = write_ct(tmp_path / "ID_000000002.dcm", random_stored(rng, (300, 256)))
    hu = read_hu(path)
    assert hu.shape == (300, 256)
    np.testing.assert_allclose(hu, random_stored(np.random.default_rng(1), (300, 256)).astype(np.float32) - 1024)


def test_12bit_intercept_quirk_recovers_tissue_hu(tmp_path):
    # Known tissue: air, CSF, brain, blood, bone. The quirky files store HU modulo 4096 (i.e. shifted
    # by -1000 against the -1000 intercept they should have had) and carry an intercept above -100.
    tissue = np.array([[-1000, 8, 35], [70, 1200, 3000]], dtype=np.float32)
    stored = np.mod(tissue, 4096).astype(np.uint16)
    path = write_ct(tmp_path / "ID_000000003.dcm", stored, intercept=1, bits_stored=12, pixel_representation=0)
    ds = read_dataset(path)
    assert has_12bit_quirk(ds)
    np.testing.assert_array_equal(read_hu(path), tissue)
    # Without the fix, air reads as dense bone: the quirk is real, not a no-op.
    naive = apply_modality_lut(ds.pixel_array, ds)
    assert naive[0, 0] > 3000


def test_ordinary_file_is_not_quirky(tmp_path):
    path = write_ct(tmp_path / "ID_000000004.dcm", np.zeros((4, 4), np.uint16), intercept=-1024)
    assert not has_12bit_quirk(read_dataset(path))
    assert (read_hu(path) == -1024).all()


def test_truncated_pixel_data_is_a_typed_error(tmp_path):
    path = write_ct(tmp_path / "ID_6431af929.dcm", random_stored(np.random.default_rng(2), (64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(DicomReadError) as info:
        read_hu(path)
    assert info.value.path == path and "ID_6431af929" in str(info.value)


def test_missing_pixel_data_is_a_typed_error(tmp_path):
    path = write_ct(tmp_path / "ID_000000005.dcm", np.zeros((4, 4), np.uint16), with_pixels=False)
    with pytest.raises(DicomReadError, match="no pixel data"):
        read_hu(path)


@pytest.mark.parametrize("content", [b"", b"not a dicom file at all" * 10, b"\0" * 200])
def test_not_dicom_is_a_typed_error(tmp_path, content):
    path = tmp_path / "ID_000000006.dcm"
    path.write_bytes(content)
    with pytest.raises(DicomReadError) as info:
        read_hu(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_typed_error(tmp_path):
    with pytest.raises(DicomReadError, match="not found"):
        read_hu(tmp_path / "nope.dcm")


@pytest.mark.parametrize(
    "value, expected",
    [(40, 40.0), ("40", 40.0), ("[00040, 00040]", 40.0), (b"00036\\00036", 36.0), (MultiValue(float, ["80", "100"]), 80.0),
     ([-1024.0], -1024.0), (None, None), ("", None)],
)
def test_first_number(value, expected):
    got = first_number(value)
    assert (np.isnan(got) if expected is None else got == expected)


def test_header_fields_windows_as_numbers_and_strings(tmp_path):
    assert header_fields(pydicom.dcmread(write_ct(tmp_path / "ID_00000000i.dcm", np.zeros((2, 2), np.uint16), instance_number=17)))["instance_number"] == 17.0
    a = write_ct(tmp_path / "ID_00000000a.dcm", np.zeros((2, 2), np.uint16), window_center=40, window_width=80, z=12.5)
    b = write_ct(tmp_path / "ID_00000000b.dcm", np.zeros((2, 2), np.uint16), window_center="00040\\00040", window_width="00080\\00080")
    for path in (a, b):
        fields = header_fields(pydicom.dcmread(path, stop_before_pixels=True))
        assert fields["window_center"] == 40.0 and fields["window_width"] == 80.0
    assert header_fields(pydicom.dcmread(a))["z"] == 12.5


def test_real_sample_matches_pydicom(real_sample):
    files = sorted((real_sample / "stage_2_test").glob("*.dcm"))
    assert len(files) == 32
    for path in files:
        ds = pydicom.dcmread(path)
        expected = apply_modality_lut(ds.pixel_array, ds)
        hu = read_hu(path)
        assert hu.shape == (512, 512)
        np.testing.assert_array_equal(hu, expected)
        fields = header_fields(pydicom.dcmread(path, stop_before_pixels=True))
        assert fields["patient_id"] == ds.PatientID == "ID_52c1ab5a"
        assert fields["z"] == pytest.approx(float(ds.ImagePositionPatient[2]))
        assert (fields["window_center"], fields["window_width"]) == (float(ds.WindowCenter[0]), float(ds.WindowWidth[0]))
        assert (fields["bits_stored"], fields["pixel_representation"], fields["intercept"]) == (12, 0, -1024.0)
    # Brain parenchyma is in there: a real head, read with the right intercept.
    centre = read_hu(files[len(files) // 2])[200:300, 200:300]
    assert -50 < float(np.median(centre)) < 100


@pytest.mark.parametrize("bits_stored, pixel_representation", [(12, 0), (16, 0), (12, 1), (16, 1), (10, 0)])
def test_fast_native_decoding_equals_pydicom(tmp_path, bits_stored, pixel_representation):
    # High bits set beyond BitsStored: pydicom masks (unsigned) or sign-extends (signed) them.
    rng = np.random.default_rng(bits_stored + pixel_representation)
    stored = rng.integers(0, 1 << 16, size=(16, 24), dtype=np.uint16)
    stored[0, :4] = [0xF123, 0x0FFF, 0x0800, 0x8000]
    stored = stored.view(np.int16) if pixel_representation else stored
    path = write_ct(tmp_path / "ID_00000000f.dcm", stored, bits_stored=bits_stored,
                    pixel_representation=pixel_representation, intercept=-1024)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(read_hu(path), apply_modality_lut(ds.pixel_array, ds).astype(np.float32))


@pytest.mark.parametrize("comment_bytes", [0, 20000])
def test_header_only_read_equals_full_read(tmp_path, comment_bytes):
    # The header pass parses an in-memory prefix when it holds the whole header; a header longer
    # than the prefix (a long comment here) must fall back to reading the file, not lose fields.
    path = write_ct(tmp_path / "ID_00000000c.dcm", np.zeros((8, 8), np.uint16), z=42.0)
    if comment_bytes:
        ds = pydicom.dcmread(path)
        ds.ImageComments = "x" * comment_bytes
        ds.save_as(path)
    header = read_dataset(path, stop_before_pixels=True)
    assert "PixelData" not in header
    got, full = header_fields(header), header_fields(pydicom.dcmread(path))
    assert got.keys() == full.keys()
    for key, value in full.items():
        assert got[key] == value or (value != value and got[key] != got[key]), key  # NaN == NaN here
    assert got["z"] == 42.0


# --- compressed transfer syntaxes ---------------------------------------------------------------
# pydicom's own test files that ship inside the package (the others are downloaded on demand, which
# tests must never do): compressed twins of MR_small, and compressed CT/NM slices.
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def pydicom_file(name: str) -> Path:
    path = PYDICOM_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped with this pydicom")
    return path


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_lossless_compressed_equals_its_uncompressed_twin(name):
    twin = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    assert pydicom.dcmread(pydicom_file(name)).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_hu(pydicom_file(name)), apply_modality_lut(twin.pixel_array, twin))


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "JPGExtended.dcm", "JPEG2000.dcm"])
def test_compressed_slices_equal_pydicoms_decoding(name):
    # Lossy JPEG 2000 CT (512 x 512, slope/intercept), lossless J2K CT, JPEG extended 12-bit, J2K NM.
    ds = pydicom.dcmread(pydicom_file(name))
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    hu = read_hu(pydicom_file(name))
    assert hu.dtype == np.float32 and hu.shape == (ds.Rows, ds.Columns)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    if "PixelPaddingValue" in ds:  # 693_J2KI.dcm pads with -2000: air, not -3024 HU
        expected[ds.pixel_array == ds.PixelPaddingValue] = AIR_HU
    np.testing.assert_array_equal(hu, expected)


def test_undecodable_compressed_file_is_a_typed_error():
    # pydicom's JPEG-lossy.dcm is a known-broken JPEG stream that every decoder rejects.
    path = pydicom_file("JPEG-lossy.dcm")
    with pytest.raises(DicomReadError, match="cannot be decoded") as info:
        read_hu(path)
    assert info.value.path == path


def gdcm_transcode(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode ``src`` in another transfer syntax with GDCM (pydicom cannot encode JPEG Lossless)."""
    gdcm = pytest.importorskip("gdcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


LOSSLESS_SYNTAXES = {  # GDCM's name -> pydicom's UID
    "JPEGLosslessProcess14_1": pydicom.uid.JPEGLosslessSV1,  # the common CT one
    "JPEGLosslessProcess14": pydicom.uid.JPEGLossless,
    "JPEGLSLossless": pydicom.uid.JPEGLSLossless,
    "JPEG2000Lossless": pydicom.uid.JPEG2000Lossless,
    "RLELossless": pydicom.uid.RLELossless,
}


@pytest.mark.parametrize("syntax", sorted(LOSSLESS_SYNTAXES))
@pytest.mark.parametrize("bits_stored, pixel_representation", [(12, 0), (16, 1)])
def test_lossless_ct_round_trips_every_codec(tmp_path, syntax, bits_stored, pixel_representation):
    rng = np.random.default_rng(bits_stored)
    if pixel_representation:  # signed CT: HU stored directly, intercept 0
        stored, intercept = rng.integers(-1024, 3072, (40, 56)).astype(np.int16), 0
    else:
        stored, intercept = random_stored(rng, (40, 56)), -1024
    src = write_ct(tmp_path / "ID_0000000aa.dcm", stored, bits_stored=bits_stored,
                   pixel_representation=pixel_representation, intercept=intercept)
    dst = gdcm_transcode(src, tmp_path / "ID_0000000ab.dcm", syntax)
    assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID == LOSSLESS_SYNTAXES[syntax]
    np.testing.assert_array_equal(read_hu(dst), read_hu(src))
    np.testing.assert_array_equal(read_hu(dst), stored.astype(np.float32) + intercept)


def test_pydicom_rle_encoding_round_trips_with_the_12bit_quirk(tmp_path):
    tissue = np.array([[-1000, 8, 35, 70], [1200, 3000, -1000, 40]], dtype=np.float32)
    src = write_ct(tmp_path / "ID_0000000ac.dcm", np.mod(tissue, 4096).astype(np.uint16), intercept=1)
    ds = pydicom.dcmread(src)
    ds.compress(pydicom.uid.RLELossless)
    ds.save_as(tmp_path / "ID_0000000ad.dcm")
    np.testing.assert_array_equal(read_hu(tmp_path / "ID_0000000ad.dcm"), tissue)


def test_jpeg_baseline_equals_pydicoms_decoding(tmp_path):
    # 8-bit lossy JPEG (process 1), as some exported CT arrives; the reference is pydicom's decoding.
    gradient = (np.add.outer(np.arange(48), np.arange(64)) * 2).astype(np.uint8)
    src = write_ct(tmp_path / "ID_0000000ae.dcm", gradient, bits_stored=8)
    ds = pydicom.dcmread(src)
    ds.BitsAllocated = 8
    ds.PixelData = gradient.tobytes()
    ds.save_as(src)
    dst = gdcm_transcode(src, tmp_path / "ID_0000000af.dcm", "JPEGBaselineProcess1")
    decoded = pydicom.dcmread(dst)
    assert decoded.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    hu = read_hu(dst)
    np.testing.assert_array_equal(hu, apply_modality_lut(decoded.pixel_array, decoded).astype(np.float32))
    assert np.abs(hu - (gradient.astype(np.float32) - 1024)).max() <= 8  # lossy, but the same image


def test_real_slice_as_jpeg_lossless_sv1(real_sample, tmp_path):
    src = sorted((real_sample / "stage_2_test").glob("*.dcm"))[0]
    dst = gdcm_transcode(src, tmp_path / src.name, "JPEGLosslessProcess14_1")
    assert dst.stat().st_size < src.stat().st_size * 0.7  # really compressed
    np.testing.assert_array_equal(read_hu(dst), read_hu(src))


def test_missing_codec_names_the_fix(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    src = write_ct(tmp_path / "ID_0000000ba.dcm", random_stored(np.random.default_rng(3), (16, 16)))
    dst = gdcm_transcode(src, tmp_path / "ID_0000000bb.dcm", "JPEGLosslessProcess14_1")
    decoder = get_decoder(pydicom.uid.JPEGLosslessSV1)  # as on a machine without the codec packages
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg-libjpeg",)})
    with pytest.raises(DicomReadError, match=r"no codec for JPEG Lossless.*Selection Value 1.*make setup"):
        read_hu(dst)
