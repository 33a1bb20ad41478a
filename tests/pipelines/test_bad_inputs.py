"""Bad input never crashes a run and is never lost: each kind is converted correctly or rejected with a reason."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from pipelines.make_shards import make_shards
from pipelines.make_shards.convert import Rejected, convert_image, convert_task, hash_task
from pipelines.make_shards.scan import Entry
from pipelines.manifest import load_manifest
from pipelines.verify import verify_shards

GOOD = "chest_xray/train/NORMAL"
SICK = "chest_xray/train/PNEUMONIA"


def gradient(width=64, height=48, high=255, dtype=np.uint8) -> np.ndarray:
    row = np.linspace(0, high, width)
    return np.tile(row, (height, 1)).astype(dtype)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def good_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray((rng.random((48, 64)) * 200 + 20).astype(np.uint8), "L"), "JPEG", quality=92)


def decoded(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "L"
        return np.asarray(image, np.float64)


@pytest.fixture(scope="module")
def bad_layout(tmp_path_factory):
    """A source with every kind of bad input next to a few good images, sharded once for all tests here."""
    src = tmp_path_factory.mktemp("bad") / "src"
    gray = gradient()
    files = {
        # converted
        f"{GOOD}/IM-0001-0001.jpeg": good_jpeg(1),
        f"{GOOD}/IM-0002-0001.jpeg": good_jpeg(2),
        f"{SICK}/person1_virus_1.jpeg": good_jpeg(3),
        f"{SICK}/person2_bacteria_2.jpeg": good_jpeg(4),
        f"{GOOD}/rgb.jpeg": encode(Image.fromarray(gray).convert("RGB"), "JPEG", quality=95),
        f"{GOOD}/cmyk.jpg": encode(Image.fromarray(gray).convert("RGB").convert("CMYK"), "JPEG", quality=95),
        f"{GOOD}/sixteen.png": encode(Image.fromarray(gradient(high=4095, dtype=np.uint16)), "PNG"),
        f"{GOOD}/palette.png": encode(Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        f"{GOOD}/alpha.png": encode(Image.merge("RGBA", [Image.fromarray(gray)] * 3 + [
            Image.fromarray(np.where(np.arange(64) < 32, 0, 255).astype(np.uint8)[None].repeat(48, 0))]), "PNG"),
        f"{GOOD}/gray-alpha.png": encode(Image.fromarray(gray).convert("LA"), "PNG"),
        f"{SICK}/UPPER CASE ñame (1).JPG": good_jpeg(5),
        f"{SICK}/dots.in.name.Jpeg": good_jpeg(6),
        # rejected
        f"{GOOD}/corrupt.jpeg": b"\xff\xd8\xff\xe0" + os.urandom(2000),
        f"{GOOD}/truncated.jpeg": good_jpeg(7)[:400],
        f"{GOOD}/empty.jpeg": b"",
        f"{SICK}/text.png": b"this is a radiology report, not an image\n",
        f"{SICK}/blank.png": encode(Image.new("L", (64, 48), 128), "PNG"),
        f"{SICK}/bomb.png": encode(Image.new("1", (8000, 7000)), "PNG"),
        # skipped
        f"{GOOD}/.DS_Store": b"\x00\x00\x00\x01Bud1",
        f"{SICK}/notes.txt": b"n/a",
        "chest_xray/README.md": b"readme",
    }
    for rel, data in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (src / SICK / os.fsdecode(b"latin1-\xe9.jpeg")).write_bytes(good_jpeg(8))  # not valid UTF-8
    (src / GOOD / "dangling.jpeg").symlink_to(src / "nowhere.jpeg")  # unreadable
    out = src.parent / "out"
    manifest = make_shards(src, out, min_shards=1, val_fraction=0, max_side=32, progress=False)
    return src, out, manifest


def sample_by_name(out: Path) -> dict[str, dict]:
    import webdataset as wds

    samples = {}
    for shard in load_manifest(out)["splits"]["train"]["shards"]:
        for sample in wds.WebDataset(str(out / shard["tar"]), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            samples[meta["source"].rsplit("/", 1)[1]] = {**meta, "jpg": sample["jpg"]}
    return samples


def test_each_bad_kind_rejected_with_reason(bad_layout):
    _, _, manifest = bad_layout
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"corrupt.jpeg", "truncated.jpeg", "empty.jpeg", "text.png", "blank.png", "bomb.png",
                            "dangling.jpeg"}
    assert "truncated" in reasons["truncated.jpeg"] or "corrupt" in reasons["truncated.jpeg"]
    assert reasons["empty.jpeg"] == "zero-byte file"
    assert "not a decodable image" in reasons["text.png"]
    assert "blank" in reasons["blank.png"]
    assert "decompression bomb" in reasons["bomb.png"] and "8000x7000" in reasons["bomb.png"]
    assert "unreadable" in reasons["dangling.jpeg"]
    assert manifest["inputs"]["rejected"] == 7


def test_every_input_accounted_once(bad_layout):
    src, out, manifest = bad_layout
    inputs = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() or p.is_symlink()}
    inputs = {p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for p in inputs}
    sharded = [m["source"] for m in sample_by_name(out).values()]
    listed = sharded + [r["path"] for r in manifest["rejected"]] + [r["path"] for r in manifest["skipped"]]
    assert len(listed) == len(set(listed)) and set(listed) == inputs
    skipped = {r["path"]: r["reason"] for r in manifest["skipped"]}
    assert "hidden" in skipped[f"{GOOD}/.DS_Store"] and "not an image" in skipped[f"{SICK}/notes.txt"]
    assert "chest_xray/README.md" in skipped
    assert verify_shards(out)


def test_odd_modes_converted_correctly(bad_layout):
    _, out, _ = bad_layout
    samples = sample_by_name(out)
    # max_side=32 halves the 64x48 inputs; a horizontal 0..255 ramp must survive every conversion.
    expected = np.asarray(Image.fromarray(gradient()).resize((32, 24), Image.Resampling.BILINEAR), np.float64)
    for name in ("rgb.jpeg", "cmyk.jpg", "palette.png", "gray-alpha.png"):
        pixels = decoded(samples[name]["jpg"])
        assert pixels.shape == (24, 32), name
        assert np.abs(pixels - expected).mean() < 6, f"{name}: not the same grayscale image after conversion"
    assert samples["cmyk.jpg"]["mode"] == "CMYK" and samples["sixteen.png"]["mode"].startswith("I")
    sixteen = decoded(samples["sixteen.png"]["jpg"])
    assert sixteen[:, :2].mean() < 10 and sixteen[:, -2:].mean() > 245, "16-bit range must be stretched to 8 bits"
    alpha = decoded(samples["alpha.png"]["jpg"])
    assert alpha[:, :15].mean() < 8, "fully transparent pixels become black"
    assert np.abs(alpha[:, 17:] - expected[:, 17:]).mean() < 6
    for name in ("UPPER CASE ñame (1).JPG", "dots.in.name.Jpeg", "latin1-\\xe9.jpeg"):
        assert name in samples and "." not in samples[name]["key"]


def test_convert_image_unit_cases():
    with pytest.raises(Rejected, match="zero-byte"):
        convert_image(b"", max_side=512, quality=90)
    big = encode(Image.fromarray(gradient(2000, 1500)), "JPEG", quality=90)
    out, info = convert_image(big, max_side=512, quality=90)
    assert (info["stored_width"], info["stored_height"]) == (512, 384) and not info["passthrough"]
    assert decoded(out).shape == (384, 512)
    same, info = convert_image(big, max_side=0, quality=90)
    assert same == big and info["passthrough"]
    with pytest.raises(Rejected, match="decompression bomb"):
        convert_image(big, max_side=512, quality=90, max_pixels=1000 * 1000)


def oriented_jpeg(width: int, height: int, orientation: int = 6) -> tuple[bytes, np.ndarray]:
    """A grayscale JPEG whose EXIF says "rotate me" (6: turn 90 degrees clockwise), and its pixels as stored."""
    pixels = np.tile(np.linspace(30, 220, width), (height, 1))
    pixels[: height // 4, : width // 4] = 255  # a bright corner: any rotation or mirror moves it
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG", quality=95, exif=exif.tobytes())
    return data, pixels


def test_exif_orientation_applied_once_at_shard_time(tmp_path):
    """Before: the small file passed through with its tag (DALI turned it, PIL did not: verify_shards failed) and
    the large one was re-encoded sideways."""
    src = tmp_path / "src"
    small, small_pixels = oriented_jpeg(64, 40)  # gray, no resize needed: the pass-through path
    large, large_pixels = oriented_jpeg(160, 100)  # larger than max_side: the re-encode path
    for rel, data in {f"{GOOD}/small.jpeg": small, f"{GOOD}/large.jpeg": large, f"{SICK}/person1_virus_1.jpeg":
                      good_jpeg(1)}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = tmp_path / "out"
    manifest = make_shards(src, out, min_shards=1, val_fraction=0, max_side=80, progress=False)
    assert manifest["inputs"]["passthrough"] == 1  # only the untagged image
    assert verify_shards(out) == {"train": 3}  # DALI, which honours EXIF, decodes the size the json records
    samples = sample_by_name(out)
    for name, pixels in (("small.jpeg", small_pixels), ("large.jpeg", large_pixels)):
        meta = samples[name]
        with Image.open(io.BytesIO(meta["jpg"])) as image:
            assert image.getexif().get(0x0112) is None, "the stored JPEG must carry no orientation tag"
            stored = np.asarray(image, np.float64)
        upright = np.rot90(pixels, k=-1)  # orientation 6, applied by hand
        assert stored.shape == (meta["stored_height"], meta["stored_width"]) and stored.shape[0] > stored.shape[1]
        expected = np.asarray(Image.fromarray(upright.astype(np.uint8)).resize(stored.shape[::-1],
                                                                               Image.Resampling.BILINEAR), np.float64)
        assert np.abs(stored - expected).mean() < 6, f"{name}: not the upright image"
        assert (meta["width"], meta["height"], meta["orientation"]) == (pixels.shape[1], pixels.shape[0], 6)


@pytest.mark.timeout(30)
def test_a_fifo_swapped_in_after_the_scan_is_rejected_not_read(tmp_path):
    """The readers open without blocking and refuse anything but a regular file."""
    fifo = tmp_path / "IM-0001-0001.jpeg"
    os.mkfifo(fifo)
    entry = Entry("chest_xray/train/NORMAL/IM-0001-0001.jpeg", "train", 0, "IM-0001", "none", "train",
                  abs_path=str(fifo))
    assert hash_task(entry) == (None, "unreadable: not a regular file", None)
    assert convert_task((entry, 512, 90, 0, 64)) == ("rejected", "unreadable: not a regular file")


def test_strict_exits_nonzero_and_writes_nothing(bad_layout, tmp_path):
    src, _, _ = bad_layout
    result = subprocess.run(
        [sys.executable, "scripts/make_shards.py", "--src", str(src), "--out", str(tmp_path / "strict"), "--strict",
         "--min-shards", "1", "--workers", "1", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "7 input(s) rejected" in result.stderr and "bomb.png" in result.stderr
    assert not (tmp_path / "strict").exists()
