"""Stages 2 and 4, validate and convert: read and hash every input, then decode, check and re-encode each image.

Both run in worker processes through `parallel_map`, whose results come back in input order, so the
output does not depend on the worker count. A bad input never raises here: it comes back as a reason.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.make_shards.scan import Entry
from pipelines.synthetic import SyntheticItem, encode_synthetic

DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 90
# 50 MP is ~7x the largest Kermany original (2,916 x 2,583); anything bigger is a decompression bomb here.
MAX_PIXELS = 50_000_000
EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 swap width and height (a 90-degree turn, possibly mirrored).
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


class Rejected(Exception):
    """An input that cannot be converted; the message is the reason recorded in the manifest."""


@dataclass
class Converted:
    """Stage 4's result: per split, `(entry, spool offset, length, info)` of every accepted image in order."""

    accepted: dict[str, list[tuple[Entry, int, int, dict]]]
    spools: dict[str, Path]
    histograms: dict[str, np.ndarray]
    passthrough: int = 0
    rejected: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # converted, with a note (e.g. DICOM without body part)


def _to_gray(image):
    """Any PIL mode -> 8-bit 'L'. Raises `Rejected` for modes with no faithful conversion."""
    from PIL import Image

    mode = image.mode
    if mode == "L":
        return image
    if mode in ("1", "RGB", "YCbCr", "CMYK", "LAB", "HSV"):
        return image.convert("RGB").convert("L") if mode not in ("1", "RGB") else image.convert("L")
    if mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        # Transparent pixels become black: an X-ray's empty background is dark.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # No window/level metadata in a PNG: stretch the used range to 8 bits (per-image windowing).
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if high <= low:
            raise Rejected(f"blank image (every pixel = {low:g})")
        scaled = np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)
        return Image.fromarray(scaled, mode="L")
    raise Rejected(f"unsupported image mode {mode}")


def _target_size(width: int, height: int, max_side: int) -> tuple[float, tuple[int, int]]:
    scale = max_side / max(width, height) if max_side and max(width, height) > max_side else 1.0
    return scale, (max(1, round(width * scale)), max(1, round(height * scale)))


def _open_pil(data: bytes, *, max_side: int, max_pixels: int):
    """Decode a PNG/JPEG/... with PIL: (8-bit gray image, target size, passthrough, info)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Rejected("not a decodable image (unknown or corrupt header)") from None
        except (OSError, SyntaxError, ValueError) as exc:  # a header cut short, a bad marker segment
            raise Rejected(f"corrupt or truncated image header: {exc}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise Rejected(f"decompression bomb guard: {exc}") from None
    width, height = image.size
    source_format, source_mode = image.format, image.mode
    if width * height > max_pixels:
        raise Rejected(f"decompression bomb guard: {width}x{height} = {width * height:,} pixels exceeds "
                       f"{max_pixels:,}")
    if width < 1 or height < 1:
        raise Rejected(f"empty image ({width}x{height})")
    scale, target = _target_size(width, height, max_side)
    try:
        orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels are usable, the tag is not (0 below)
        orientation = 0
    passthrough = source_format == "JPEG" and source_mode == "L" and scale == 1.0 and orientation == 1
    try:
        if source_format == "JPEG" and scale < 1.0 and source_mode in ("L", "RGB"):
            # DCT-domain downscaling (1/2, 1/4, 1/8) in libjpeg: most of the decode work is skipped.
            image.draft("L", target)
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError/SyntaxError/ValueError for corrupt data
        raise Rejected(f"corrupt or truncated image data: {exc}") from None
    if 2 <= orientation <= 8:
        image = ImageOps.exif_transpose(image)
        if orientation in TRANSPOSED_ORIENTATIONS:
            target = target[::-1]
    info = {"width": width, "height": height, "mode": source_mode, "format": source_format,
            "orientation": orientation}
    return _to_gray(image), target, passthrough, info


def _open_dicom(data: bytes, *, max_side: int, max_pixels: int):
    """Decode a DICOM file (see `dicom`): (8-bit gray image, target size, False, info)."""
    from PIL import Image

    from pipelines.make_shards import dicom  # imports this module: not at the top

    pixels, info = dicom.decode(data, max_pixels=max_pixels)
    _, target = _target_size(info["width"], info["height"], max_side)
    spacing = info["dicom"]["pixel_spacing_mm"]
    # The spacing of the stored (resized) pixels, so a model or a reader can measure in mm.
    info["dicom"]["stored_pixel_spacing_mm"] = None if spacing is None else [
        round(spacing[0] * info["height"] / target[1], 6), round(spacing[1] * info["width"] / target[0], 6)]
    return Image.fromarray(pixels, "L"), target, False, info


def open_gray(data: bytes, *, max_side: int = 0, max_pixels: int = MAX_PIXELS):
    """Any input make_shards accepts (PIL formats, DICOM by its preamble) -> (upright 8-bit gray image, target
    size, passthrough, info); `Rejected` with the reason otherwise. Also what `predict` decodes new images with."""
    from pipelines.make_shards.dicom import is_dicom

    if not data:
        raise Rejected("zero-byte file")
    opener = _open_dicom if is_dicom(data) else _open_pil
    return opener(data, max_side=max_side, max_pixels=max_pixels)


def convert_image(data: bytes, *, max_side: int, quality: int, max_pixels: int = MAX_PIXELS):
    """Validate and convert one encoded image (a DICOM file is recognised by its preamble, not its name).

    Returns `(jpeg_bytes, info)` with info `{width, height, mode, format, orientation, stored_width,
    stored_height, passthrough, histogram}` (and `dicom`, `warnings` for DICOM); raises `Rejected` with the
    reason for anything unusable.
    An EXIF orientation is applied here, once: the stored pixels are upright and carry no orientation tag,
    because DALI's decoder honours the tag and PIL's does not, so a tagged file would reach the two loaders
    (and `verify_shards`) rotated differently. `width`/`height` are the file's, before that rotation.
    """
    from PIL import Image

    gray, target, passthrough, info = open_gray(data, max_side=max_side, max_pixels=max_pixels)
    if gray.size != target:
        gray = gray.resize(target, Image.Resampling.BILINEAR, reducing_gap=None)
    low, high = gray.getextrema()
    if low == high:
        raise Rejected(f"blank image (every pixel = {low})")
    if passthrough:
        encoded = data
    else:
        buffer = io.BytesIO()
        gray.save(buffer, "JPEG", quality=quality)
        encoded = buffer.getvalue()
    info.update(stored_width=target[0], stored_height=target[1], passthrough=passthrough,
                histogram=gray.histogram())
    return encoded, info


def read_regular_file(path: str) -> bytes:
    """The file's bytes; an `OSError` for anything but a regular file (the scan skips those; this guards a
    FIFO swapped in afterwards, whose plain open() would block forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return handle.read()


def _read_input(entry: Entry, seed: int, synthetic_size: int) -> bytes:
    if entry.synthetic_index >= 0:
        item = SyntheticItem(entry.synthetic_index, entry.split, entry.label, entry.patient, entry.subtype, entry.path)
        return encode_synthetic(item, seed=seed, size=synthetic_size)
    return read_regular_file(entry.abs_path)


def hash_task(entry: Entry):
    """Worker body: `(sha256, None, PatientID)` or `(None, reason, None)` for an unreadable or empty file.

    The DICOM header's PatientID is read here, while the bytes are in memory, because the split (which
    needs it) comes before the conversion; None for other files."""
    from pipelines.make_shards.dicom import header_patient_id

    try:
        data = read_regular_file(entry.abs_path)
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}", None
    if not data:
        return None, "zero-byte file", None
    return hashlib.sha256(data).hexdigest(), None, header_patient_id(data)


def convert_task(task):
    """Worker body: returns ("ok", bytes, info) or ("rejected", reason). Never raises on bad input."""
    entry, max_side, quality, seed, synthetic_size = task
    try:
        data = _read_input(entry, seed, synthetic_size)
        encoded, info = convert_image(data, max_side=max_side, quality=quality)
        return "ok", encoded, info
    except Rejected as exc:
        return "rejected", str(exc)
    except OSError as exc:
        return "rejected", f"unreadable: {exc.strerror or exc}"
    except Exception as exc:  # noqa: BLE001 - one bad image must not end a multi-hour run; it is recorded
        return "rejected", f"cannot convert: {type(exc).__name__}: {exc}"


def parallel_map(function, tasks, pool, workers: int, description: str, progress: bool):
    """Ordered map (results do not depend on the worker count) with a progress bar; in-process without a pool."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=description, unit="img", disable=not progress, file=sys.stderr)
    try:
        if pool is None:
            results = map(function, tasks)
        else:
            results = pool.imap(function, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8))))
        for result in results:
            yield result
            bar.update()
    finally:
        bar.close()


def start_pool(workers: int):
    if workers <= 1:
        return None
    import multiprocessing

    # spawn, not fork: the caller may hold threads (torch, DALI) that a forked child would inherit locked.
    return multiprocessing.get_context("spawn").Pool(workers)


@dataclass
class Hashed:
    """Stage 2's result: the readable entries, their sha256, the DICOM PatientID of each DICOM file (by
    path) and the rejected records."""

    readable: list[Entry]
    hashes: list[str]
    header_patients: dict[str, str]
    rejected: list[dict]


def hash_inputs(entries: list[Entry], pool, workers: int, progress: bool) -> Hashed:
    """Read and hash every file on disk (and note DICOM PatientIDs)."""
    hashed = Hashed([], [], {}, [])
    for entry, (digest, error, patient) in zip(
            entries, parallel_map(hash_task, entries, pool, workers, "hash", progress), strict=True):
        if error:
            hashed.rejected.append({"path": entry.path, "reason": error})
            continue
        hashed.readable.append(entry)
        hashed.hashes.append(digest)
        if patient is not None:
            hashed.header_patients[entry.path] = patient
    return hashed


def convert_all(ordered: list[Entry], tmp: Path, *, max_side: int, quality: int, seed: int, synthetic_size: int,
                pool, workers: int, progress: bool) -> Converted:
    """Convert `ordered` and append the JPEG bytes to one spool file per split under `tmp` (kept in order)."""
    splits = list(dict.fromkeys(e.split for e in ordered))
    converted = Converted({s: [] for s in splits}, {s: tmp / f"_spool-{s}.bin" for s in splits},
                          {s: np.zeros(256, np.int64) for s in splits})
    tasks = [(e, max_side, quality, seed, synthetic_size) for e in ordered]
    handles = {s: open(converted.spools[s], "wb") for s in splits}  # noqa: SIM115 - closed in finally below
    try:
        for entry, result in zip(ordered, parallel_map(convert_task, tasks, pool, workers, "convert", progress),
                                 strict=True):
            if result[0] == "rejected":
                converted.rejected.append({"path": entry.path, "reason": result[1]})
                continue
            _, encoded, info = result
            handle = handles[entry.split]
            converted.accepted[entry.split].append((entry, handle.tell(), len(encoded), info))
            handle.write(encoded)
            converted.histograms[entry.split] += np.asarray(info.pop("histogram"), np.int64)
            converted.passthrough += info["passthrough"]
            converted.warnings += [{"path": entry.path, "warning": w} for w in info.pop("warnings", [])]
    finally:
        for handle in handles.values():
            handle.close()
    return converted
