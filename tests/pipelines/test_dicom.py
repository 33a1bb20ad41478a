"""DICOM input: display conventions checked against numpy references, rejects with reasons, and DICOMs in the
Kaggle layout (also under a .jpeg name) sharded, verified and read by both loaders."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from _dicom import (
    dataset,
    radiograph,
    reference_lut,
    reference_minmax,
    reference_window,
    to_bytes,
    with_voi_lut,
)
from PIL import Image

from pipelines.make_shards import make_shards
from pipelines.make_shards.convert import Rejected, convert_image, hash_task
from pipelines.make_shards.dicom import decode, is_dicom
from pipelines.make_shards.patients import hash_patient
from pipelines.make_shards.scan import Entry
from pipelines.verify import verify_shards

MAX_PIXELS = 50_000_000


def decoded(data: bytes) -> tuple[np.ndarray, dict]:
    return decode(data, max_pixels=MAX_PIXELS)


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: int = 1) -> None:
    """Equal up to float rounding; and far from the inverted image, so the check can tell the two apart."""
    assert actual.shape == expected.shape and actual.dtype == np.uint8
    difference = np.abs(actual.astype(int) - expected.astype(int))
    assert difference.max() <= tolerance, f"max difference {difference.max()}"
    assert np.abs(actual.astype(int) - (255 - expected.astype(int))).mean() > 40


def window_case(photometric: str, bits: int = 12, **extra):
    raw = radiograph(bits)
    # Rescale moves stored values to "HU-like" units; the window is given in those units (after the
    # Modality LUT), so a decoder that skips the rescale windows the wrong range.
    ds = dataset(raw, bits=bits, photometric=photometric, RescaleSlope=2, RescaleIntercept=-1000,
                 WindowCenter=3000, WindowWidth=4001, **extra)
    expected = reference_window(raw, 3000, 4001, slope=2, intercept=-1000, monochrome1=photometric == "MONOCHROME1")
    return ds, expected


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_window_applied_after_rescale_and_monochrome1_inverted_after_it(photometric):
    ds, expected = window_case(photometric)
    pixels, info = decoded(to_bytes(ds))
    assert_close(pixels, expected)
    # The window clips: some pixels saturate at both ends, so an un-windowed min-max stretch differs.
    assert (expected == 0).any() and (expected == 255).any()
    assert np.abs(pixels.astype(int) - reference_minmax(radiograph(12), photometric == "MONOCHROME1")).max() > 20
    assert info["dicom"]["voi"] == "Window Center/Width" and info["dicom"]["window"] == [3000.0, 4001.0]
    assert info["mode"] == photometric and info["format"] == "DICOM" and (info["width"], info["height"]) == (96, 80)


def test_first_of_several_windows_is_used():
    raw = radiograph(12)
    ds = dataset(raw, WindowCenter=[1000, 3000], WindowWidth=[800, 200])
    assert_close(decoded(to_bytes(ds))[0], reference_window(raw, 1000, 800))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_16_bit_voi_lut_sequence_wins_over_the_window(photometric):
    raw = radiograph(16)
    first, entries = 10_000, 40_000
    lut = np.round(65535 * np.linspace(0, 1, entries) ** 0.5).astype(np.uint16)  # a gamma curve, not a window
    ds = with_voi_lut(dataset(raw, bits=16, photometric=photometric, WindowCenter=100, WindowWidth=50), first, lut)
    pixels, info = decoded(to_bytes(ds))
    assert_close(pixels, reference_lut(raw, first, lut, monochrome1=photometric == "MONOCHROME1"))
    assert info["dicom"]["voi"] == "VOI LUT Sequence" and info["dicom"]["bits_stored"] == 16


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("signed", [False, True])
def test_16_bit_without_voi_stretches_the_image_range(photometric, signed):
    raw = radiograph(16, signed=signed)
    pixels, info = decoded(to_bytes(dataset(raw, bits=16, photometric=photometric)))
    assert_close(pixels, reference_minmax(raw, monochrome1=photometric == "MONOCHROME1"))
    assert info["dicom"]["voi"].startswith("none")


def test_rle_lossless_decodes_to_the_same_pixels():
    ds, expected = window_case("MONOCHROME1")
    data = to_bytes(ds, rle=True)
    pixels, info = decoded(data)
    assert info["dicom"]["transfer_syntax"] == "RLE Lossless"
    assert_close(pixels, expected)


@pytest.mark.parametrize("case", ["window", "lut", "none"])
def test_per_level_table_equals_transforming_every_pixel(case):
    """`to_8bit` transforms each stored level once and indexes; the per-pixel path (32-bit data) must agree."""
    import pydicom

    from pipelines.make_shards.dicom import _display_levels, _voi_name, to_8bit

    raw = radiograph(16)
    ds = dataset(raw, bits=16, photometric="MONOCHROME1", RescaleSlope=1, RescaleIntercept=-100)
    if case == "window":
        ds.WindowCenter, ds.WindowWidth = 30_000, 20_000
    elif case == "lut":
        with_voi_lut(ds, 5_000, np.round(np.linspace(0, 65535, 50_000) ** 1.0).astype(np.uint16))
    ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    stored = ds.pixel_array
    table, _ = to_8bit(ds, stored)
    direct, _ = _display_levels(ds, stored, _voi_name(ds), None)
    assert (table == direct).all()


def test_pixel_spacing_and_patient_id_are_read():
    raw = radiograph()
    spaced = to_bytes(dataset(raw, PixelSpacing=[0.14, 0.15], ImagerPixelSpacing=[0.2, 0.2]))
    imager = to_bytes(dataset(raw, ImagerPixelSpacing=[0.2, 0.25], patient=None))
    assert decoded(spaced)[1]["dicom"]["pixel_spacing_mm"] == [0.14, 0.15]
    assert decoded(spaced)[1]["dicom"]["pixel_spacing_tag"] == "PixelSpacing"
    assert decoded(imager)[1]["dicom"]["pixel_spacing_tag"] == "ImagerPixelSpacing"
    # Resized to 48 px wide (half): the stored pixels are twice as far apart.
    _, info = convert_image(imager, max_side=48, quality=90)
    assert info["dicom"]["stored_pixel_spacing_mm"] == [0.4, 0.5] and info["stored_width"] == 48


def test_missing_body_part_is_a_warning_not_a_reject():
    _, info = decoded(to_bytes(dataset(radiograph(), body_part=None)))
    assert info["warnings"] == ["no BodyPartExamined (0018,0015): assumed to be a chest radiograph"]
    assert decoded(to_bytes(dataset(radiograph(), body_part="PORT CHEST")))[1]["warnings"] == []


def truncated() -> bytes:
    data = to_bytes(dataset(radiograph()))
    return data[:-1000]


def jpeg_lossless_without_decoder() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder (pylibjpeg-libjpeg or gdcm) is installed here")
    ds = dataset(radiograph())
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def no_pixel_data() -> bytes:
    ds = dataset(radiograph())
    del ds.PixelData
    return to_bytes(ds)


@pytest.mark.parametrize("make, reason", [
    (lambda: to_bytes(dataset(np.stack([radiograph()] * 3), NumberOfFrames=3)), r"multi-frame DICOM \(3 frames\)"),
    (lambda: to_bytes(dataset(radiograph(), modality="CT", body_part="CHEST")), "Modality CT: not a radiograph"),
    (lambda: to_bytes(dataset(radiograph(), modality="")), r"no Modality \(0008,0060\)"),
    (lambda: to_bytes(dataset(radiograph(), body_part="KNEE")), "BodyPartExamined KNEE: not a chest radiograph"),
    (no_pixel_data, r"no pixel data \(PixelData \(7FE0,0010\) missing"),
    (truncated, "corrupt or truncated DICOM pixel data: The number of bytes of pixel data is less than expected"),
    (lambda: to_bytes(dataset(radiograph()))[:300], "damaged or truncated DICOM: no Modality, Rows or PixelData"),
    (lambda: to_bytes(dataset(radiograph()))[:150], r"damaged DICOM header: no Transfer Syntax UID"),
    (jpeg_lossless_without_decoder, r"compressed DICOM \(JPEG Lossless.*pip install 'cxr-pipeline\[dicom-codecs\]'"),
    (lambda: to_bytes(dataset(np.full((80, 96), 700, np.uint16))), r"blank image \(every pixel = 700"),
])
def test_unusable_dicom_is_rejected_with_the_reason(make, reason):
    data = make()
    assert is_dicom(data)
    with pytest.raises(Rejected, match=reason) as error:
        convert_image(data, max_side=0, quality=90)
    assert "\n" not in str(error.value)


def test_a_dicom_named_jpeg_is_recognised_and_its_patient_read(tmp_path):
    path = tmp_path / "person1_bacteria_1.jpeg"
    path.write_bytes(to_bytes(dataset(radiograph(), patient="MRN 12345")))
    entry = Entry("x", "train", 1, "person1", "bacteria", "train", abs_path=str(path))
    digest, error, patient = hash_task(entry)
    assert error is None and patient == "MRN 12345"
    encoded, info = convert_image(path.read_bytes(), max_side=0, quality=95)
    assert info["format"] == "DICOM" and Image.open(io.BytesIO(encoded)).format == "JPEG"


def kaggle_dicoms(root):
    """A Kaggle-layout tree of DICOMs: 12-bit MONOCHROME1 with a window (.dcm), 16-bit MONOCHROME2 saved as
    .jpeg, an RLE one, one without body part, and one CT slice; two images per patient."""
    expected = {}
    for p in range(6):
        for i in range(2):
            label = "PNEUMONIA" if p % 2 else "NORMAL"
            monochrome1 = (p + i) % 2 == 0
            raw = radiograph(12 if i == 0 else 16, height=80 + 8 * p, width=96)
            if i == 0:
                ds = dataset(raw, photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2", patient=f"MRN-{p}",
                             WindowCenter=2048, WindowWidth=2048, PixelSpacing=[0.15, 0.15],
                             body_part=None if p == 5 else "CHEST")
                reference = reference_window(raw, 2048, 2048, monochrome1=monochrome1)
                name = f"IM-{p:04d}-0001.dcm"
            else:
                ds = dataset(raw, bits=16, photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
                             patient=f"MRN-{p}", ImagerPixelSpacing=[0.2, 0.2])
                reference = reference_minmax(raw, monochrome1=monochrome1)
                name = f"IM-{p:04d}-0002.jpeg"  # a DICOM under a JPEG name
            rel = f"chest_xray/train/{label}/{name}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(to_bytes(ds, rle=p == 3 and i == 0))
            expected[rel] = reference
    ct = "chest_xray/train/NORMAL/IM-0099-0001.dcm"
    (root / ct).write_bytes(to_bytes(dataset(radiograph(), modality="CT")))
    return expected, ct


def test_kaggle_layout_dicoms_shard_verify_and_load_with_both_loaders(tmp_path):
    from pipelines.loaders import build_loader
    from pipelines.spec import PreprocessSpec

    src, out = tmp_path / "src", tmp_path / "out"
    expected, ct = kaggle_dicoms(src)
    manifest = make_shards(src, out, max_side=0, quality=95, min_shards=1, val_fraction=0.34,
                           patient_salt="test-salt", progress=False)
    assert [r["path"] for r in manifest["rejected"]] == [ct]
    assert "Modality CT" in manifest["rejected"][0]["reason"]
    assert manifest["inputs"]["sharded"] == 12 and manifest["inputs"]["warnings"] == 1
    assert manifest["warnings"] == [{"path": "chest_xray/train/PNEUMONIA/IM-0005-0001.dcm",
                                     "warning": "no BodyPartExamined (0018,0015): assumed to be a chest radiograph"}]
    # Counted over every readable input (the CT slice too: it is rejected later, at conversion).
    assert manifest["patients"]["from"] == {"DICOM PatientID": 13} and manifest["patients"]["salt"] is None
    assert verify_shards(out) == {s: i["samples"] for s, i in manifest["splits"].items()}
    assert "MRN" not in (out / "manifest.json").read_text()
    samples = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            import webdataset as wds

            for sample in wds.WebDataset(str(out / shard["tar"]), shardshuffle=False, empty_check=False):
                meta = json.loads(sample["json"])
                samples[meta["source"]] = (split, meta, np.asarray(Image.open(io.BytesIO(sample["jpg"]))))
    assert set(samples) == set(expected)
    for rel, (_, meta, pixels) in samples.items():
        # JPEG at quality 95 of a smooth image: a few levels off at most; an inverted image is ~128 off.
        error = np.abs(pixels.astype(int) - expected[rel].astype(int))
        assert error.mean() < 2.0, (rel, error.mean())
        assert np.abs(pixels.astype(int) - (255 - expected[rel].astype(int))).mean() > 40
        number = int(rel.split("IM-")[1][:4])
        assert meta["patient"] == hash_patient(f"MRN-{number}", "test-salt")
        assert meta["dicom"]["pixel_spacing_mm"] == ([0.15, 0.15] if rel.endswith(".dcm") else [0.2, 0.2])
    # A patient's two images (one .dcm, one .jpeg-named) stay in one split.
    for number in range(6):
        assert len({samples[r][0] for r in samples if f"IM-{number:04d}-" in r}) == 1
    spec = PreprocessSpec.from_manifest(out, image_size=32)
    for loader in ("dali", "torch"):
        for split in manifest["splits"]:
            built = build_loader(out, split, spec=spec, per_device_batch_size=2, train=False, loader=loader,
                                 num_workers=1)
            keys = [k for batch in built for k in batch.keys]
            assert sorted(keys) == sorted(f"{split}-{i:08d}" for i in range(manifest["splits"][split]["samples"]))


def test_generated_salt_is_recorded_and_a_given_salt_is_not(tmp_path):
    src = tmp_path / "src"
    kaggle_dicoms(src)
    manifest = make_shards(src, tmp_path / "a", max_side=64, min_shards=1, val_fraction=0, progress=False)
    salt = manifest["patients"]["salt"]
    assert len(salt) == 32 and manifest["args"]["patient_salt"] is None
    again = make_shards(src, tmp_path / "b", max_side=64, min_shards=1, val_fraction=0, patient_salt=salt,
                        progress=False)
    assert again["args"]["patient_salt"] == "given (not recorded)" and salt not in json.dumps(again)
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
           [s["sha256"] for s in manifest["splits"]["train"]["shards"]], "same salt, same shards"
