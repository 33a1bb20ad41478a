"""Kaggle chest-X-ray folders (or a synthetic set) -> verified WebDataset shards + DALI indexes + manifest.

Library behind `python scripts/make_shards.py --src PATH/chest_xray --out shards/kermany` (see that script
for the options). Stages, in order:

1. scan: `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png}` (case-insensitive); hidden and
   non-image files and unknown folders go to `skipped`;
2. hash every image (sha256): unreadable and zero-byte files go to `rejected`, byte-identical copies are
   kept once (train before val before test, then by path) and the rest listed in `duplicates`;
3. split: official splits are kept; when the source val split is missing or tiny (Kaggle's has 16
   images) it is merged into train and a val split is carved from train **by patient**, per class;
4. convert, in parallel and in a seeded shuffled order: decode and validate, 8-bit single channel,
   longer side <= `max_side` (JPEG draft/DCT scaling first), JPEG `quality`; grayscale JPEGs that need no
   resize are passed through byte for byte. Failures go to `rejected` with the reason;
5. write `<split>/<split>-NNNNNN.tar` with `webdataset.TarWriter` (fixed mtime, so reruns are
   byte-identical), a DALI `.idx` next to each (DALI's own `wds2idx` code), and `manifest.json` with
   counts, hashes and the train pixel mean/std;
6. publish atomically: everything is written to `<out>.tmp-<pid>` and renamed at the end.

Why `max_side` defaults to 512: training reads 224 px random-resized crops; a crop covering 35 % of the
image area at 224 px needs about 224 / sqrt(0.35) ~ 380 px of source, so 512 px keeps the pixels every
crop scale actually uses (and a 2x margin for 224 px eval resizing), while JPEG decode cost grows with
area: a 512 px image decodes ~4x faster than a 1,000 px one and ~16-30x faster than Kermany's 2,000-
2,900 px originals, and shrinks the dataset ~10x. Use `--max-side 0` to keep full resolution.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipelines.manifest import LABELS, MANIFEST_NAME, MANIFEST_VERSION, SPLITS, ShardsError, sha256_file
from pipelines.synthetic import DEFAULT_SYNTHETIC_SIZE, SyntheticItem, encode_synthetic, plan_synthetic

DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 90
DEFAULT_MIN_SHARDS = 8
DEFAULT_SHARD_MB = 64.0
# 50 MP is ~7x the largest Kermany original (2,916 x 2,583); anything bigger is a decompression bomb here.
MAX_PIXELS = 50_000_000
# A source val split smaller than this is not a usable validation set (Kaggle's has 16 images).
MIN_SOURCE_VAL = 100
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
# Fixed tar mtime (2000-01-01): byte-identical reruns need it.
TAR_MTIME = 946_684_800
LAYOUT = ("expected the Kaggle layout chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg "
          "(pass the folder that contains chest_xray/ or chest_xray/ itself)")


@dataclass(frozen=True)
class Entry:
    """One input image and where it is going."""

    path: str  # relative to the input root (posix); also the identity in the manifest
    split: str
    label: int
    patient: str
    subtype: str
    source_split: str
    abs_path: str = ""  # empty for synthetic inputs
    synthetic_index: int = -1


class Rejected(Exception):
    """An input that cannot be converted; the message is the reason recorded in the manifest."""


# --------------------------------------------------------------------------------------------- scan

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # person123_bacteria_456
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),  # IM-0115-0001, NORMAL2-IM-0012-0001
)


def patient_and_subtype(file_name: str) -> tuple[str, str]:
    """Kermany file names carry the patient id and the pneumonia subtype; fall back to the file stem."""
    stem = file_name.rsplit(".", 1)[0]
    patient = stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            patient = match.group(1)
            break
    lowered = stem.lower()
    subtype = "bacteria" if "bacteria" in lowered else "virus" if "virus" in lowered else "none"
    return patient, subtype


def _display(path: Path | str) -> str:
    # Odd (non-UTF-8) names survive as surrogate escapes; make them printable and JSON-safe.
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def find_root(src: Path) -> Path:
    src = Path(src)
    if not src.exists():
        raise ShardsError(f"source {src} does not exist; {LAYOUT}")
    if not src.is_dir():
        raise ShardsError(f"source {src} is not a folder; {LAYOUT}")
    nested = [p for p in src.iterdir() if p.is_dir() and p.name.lower() == "chest_xray"]
    has_splits = any(p.is_dir() and p.name.lower() in SPLITS for p in src.iterdir())
    if nested and not has_splits:
        return nested[0]
    return src


def scan_source(src: Path) -> tuple[Path, list[Entry], list[dict]]:
    """Find every image of the Kaggle layout under `src`; return (root, images, skipped)."""
    root = find_root(src)
    # Paths in the manifest start at chest_xray/ whichever of the two accepted folders was given.
    base = root.parent if root.name.lower() == "chest_xray" else root
    entries: list[Entry] = []
    skipped: list[dict] = []

    def rel(path: Path) -> str:
        return _display(path.relative_to(base).as_posix())

    def skip_tree(path: Path, reason: str) -> None:
        files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
        for file in files:
            skipped.append({"path": rel(file), "reason": reason})

    split_dirs = {}
    for child in sorted(root.iterdir()):
        name = child.name.lower()
        if child.is_dir() and name in SPLITS and name not in split_dirs:
            split_dirs[name] = child
        elif child.name.startswith("."):
            skip_tree(child, "hidden file or folder")
        else:
            skip_tree(child, f"not inside a {{train,val,test}}/{{NORMAL,PNEUMONIA}} folder of {_display(root)}")
    if not split_dirs:
        raise ShardsError(f"no train/val/test folder in {_display(root)}; {LAYOUT}")
    for split, split_dir in split_dirs.items():
        class_dirs = {}
        for child in sorted(split_dir.iterdir()):
            if child.is_dir() and child.name.upper() in LABELS and child.name.upper() not in class_dirs:
                class_dirs[child.name.upper()] = child
            elif child.name.startswith("."):
                skip_tree(child, "hidden file or folder")
            else:
                skip_tree(child, f"not a class folder (expected {'/'.join(LABELS)})")
        missing = [name for name in LABELS if name not in class_dirs]
        if missing:
            raise ShardsError(f"split folder {_display(split_dir)} has no {' or '.join(missing)} folder; {LAYOUT}")
        for label_name, class_dir in class_dirs.items():
            for path in sorted(class_dir.rglob("*")):
                if path.is_dir() and not path.is_symlink():
                    continue
                if any(part.startswith(".") for part in path.relative_to(class_dir).parts):
                    skipped.append({"path": rel(path), "reason": "hidden file"})
                elif path.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append({"path": rel(path), "reason": f"not an image extension ({'/'.join(sorted(IMAGE_SUFFIXES))})"})
                else:
                    patient, subtype = patient_and_subtype(path.name)
                    entries.append(Entry(rel(path), split, LABELS.index(label_name), _display(patient), subtype,
                                         split, abs_path=str(path)))
    if not entries:
        raise ShardsError(f"no images (.jpeg/.jpg/.png) found under {_display(root)}; {LAYOUT}")
    return root, entries, skipped


# ------------------------------------------------------------------------------------------ convert


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


def convert_image(data: bytes, *, max_side: int, quality: int, max_pixels: int = MAX_PIXELS):
    """Validate and convert one encoded image.

    Returns `(jpeg_bytes, info)` with info `{width, height, mode, format, stored_width, stored_height,
    passthrough, histogram}`; raises `Rejected` with the reason for anything unusable.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Rejected("zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Rejected("not a decodable image (unknown or corrupt header)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise Rejected(f"decompression bomb guard: {exc}") from None
    width, height = image.size
    source_format, source_mode = image.format, image.mode
    if width * height > max_pixels:
        raise Rejected(f"decompression bomb guard: {width}x{height} = {width * height:,} pixels exceeds "
                       f"{max_pixels:,}")
    if width < 1 or height < 1:
        raise Rejected(f"empty image ({width}x{height})")
    scale = max_side / max(width, height) if max_side and max(width, height) > max_side else 1.0
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    passthrough = source_format == "JPEG" and source_mode == "L" and scale == 1.0
    try:
        if source_format == "JPEG" and scale < 1.0 and source_mode in ("L", "RGB"):
            # DCT-domain downscaling (1/2, 1/4, 1/8) in libjpeg: most of the decode work is skipped.
            image.draft("L", target)
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError/SyntaxError/ValueError for corrupt data
        raise Rejected(f"corrupt or truncated image data: {exc}") from None
    gray = _to_gray(image)
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
    info = {"width": width, "height": height, "mode": source_mode, "format": source_format,
            "stored_width": target[0], "stored_height": target[1], "passthrough": passthrough,
            "histogram": gray.histogram()}
    return encoded, info


def _read_input(entry: Entry, seed: int, synthetic_size: int) -> bytes:
    if entry.synthetic_index >= 0:
        item = SyntheticItem(entry.synthetic_index, entry.split, entry.label, entry.patient, entry.subtype, entry.path)
        return encode_synthetic(item, seed=seed, size=synthetic_size)
    with open(entry.abs_path, "rb") as handle:
        return handle.read()


def _convert_task(task):
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


def _hash_task(entry: Entry):
    try:
        with open(entry.abs_path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if not data:
        return None, "zero-byte file"
    return hashlib.sha256(data).hexdigest(), None


# ------------------------------------------------------------------------------------ split / dedupe


def remove_duplicates(entries: list[Entry], hashes: list[str]) -> tuple[list[Entry], list[dict]]:
    """Keep one copy of each byte-identical group: the earliest split (train, val, test), then path."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry, digest in zip(entries, hashes, strict=True):
        groups[digest].append(entry)
    removed_paths = set()
    duplicates = []
    for digest, group in sorted(groups.items()):
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda e: (SPLITS.index(e.split), e.path))
        kept, removed = group[0], group[1:]
        removed_paths.update(e.path for e in removed)
        duplicates.append({"sha256": digest, "kept": kept.path, "removed": [e.path for e in removed],
                           "splits": sorted({e.split for e in group}, key=SPLITS.index),
                           "cross_split": len({e.split for e in group}) > 1})
    duplicates.sort(key=lambda d: d["kept"])
    return [e for e in entries if e.path not in removed_paths], duplicates


def carve_val_by_patient(entries: list[Entry], val_fraction: float, seed: int) -> list[Entry]:
    """Move whole train patients to val until each class has `val_fraction` of its train images there."""
    rng = np.random.default_rng([seed, 0xCA4E])
    images_of: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        if entry.split == "train":
            images_of[entry.patient].append(entry)
    moved = set()
    for label in range(len(LABELS)):
        # A patient belongs to the class most of its images have (Kermany patients have one class).
        patients = sorted(p for p, imgs in images_of.items()
                          if Counter(e.label for e in imgs).most_common(1)[0][0] == label)
        wanted = val_fraction * sum(len(images_of[p]) for p in patients)
        taken = 0
        for i in rng.permutation(len(patients)):
            if taken >= wanted:
                break
            moved.add(patients[i])
            taken += len(images_of[patients[i]])
    return [replace(e, split="val") if e.split == "train" and e.patient in moved else e for e in entries]


def patient_overlap(entries: list[Entry]) -> dict[str, int]:
    patients = defaultdict(set)
    for entry in entries:
        patients[entry.split].add(entry.patient)
    overlap = {}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            common = patients[a] & patients[b]
            if common:
                overlap[f"{a}/{b}"] = len(common)
    return overlap


# -------------------------------------------------------------------------------------------- write


def write_index(tar_path: Path, index_path: Path) -> None:
    """The `.idx` DALI's `fn.readers.webdataset(index_paths=...)` reads, written by DALI's own `wds2idx`."""
    from wds2idx import IndexCreator  # ships with the nvidia-dali wheel

    creator = IndexCreator(str(tar_path), str(index_path), verbose=False)
    try:
        creator.create_index()
    finally:
        creator.close()


def _write_split_shards(tmp: Path, split: str, accepted: list[tuple[Entry, int, int, dict]], spool: Path,
                        shard_mb: float, min_shards: int) -> list[dict]:
    from webdataset import TarWriter

    if not accepted:
        return []
    total_bytes = sum(length for _, _, length, _ in accepted)
    num_shards = max(min(min_shards, len(accepted)), math.ceil(total_bytes / (shard_mb * 2**20)))
    (tmp / split).mkdir(parents=True, exist_ok=True)
    shards = []
    counter = 0
    with open(spool, "rb") as spool_file:
        for shard_number, chunk in enumerate(np.array_split(np.arange(len(accepted)), num_shards)):
            tar_rel = f"{split}/{split}-{shard_number:06d}.tar"
            index_rel = f"{split}/{split}-{shard_number:06d}.idx"
            with TarWriter(str(tmp / tar_rel), encoder=False, mtime=TAR_MTIME) as sink:
                for i in chunk:
                    entry, offset, length, info = accepted[i]
                    spool_file.seek(offset)
                    key = f"{split}-{counter:08d}"
                    counter += 1
                    meta = {"key": key, "source": entry.path, "label": entry.label, "label_name": LABELS[entry.label],
                            "patient": entry.patient, "subtype": entry.subtype, "source_split": entry.source_split,
                            "width": info["width"], "height": info["height"], "mode": info["mode"],
                            "stored_width": info["stored_width"], "stored_height": info["stored_height"]}
                    sink.write({"__key__": key, "jpg": spool_file.read(length), "cls": str(entry.label).encode(),
                                "json": json.dumps(meta, sort_keys=True).encode()})
            write_index(tmp / tar_rel, tmp / index_rel)
            shards.append({"tar": tar_rel, "index": index_rel, "samples": len(chunk),
                           "bytes": (tmp / tar_rel).stat().st_size, "sha256": sha256_file(tmp / tar_rel),
                           "index_sha256": sha256_file(tmp / index_rel)})
    return shards


def _pixel_stats(histogram: np.ndarray) -> dict:
    count = histogram.sum()
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = float((histogram * levels).sum() / count)
    var = float((histogram * levels**2).sum() / count) - mean**2
    return {"mean": round(mean, 6), "std": round(math.sqrt(max(var, 0.0)), 6), "pixels": int(count)}


def _imap(function, tasks, pool, workers: int, description: str, progress: bool):
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


def _start_pool(workers: int):
    if workers <= 1:
        return None
    import multiprocessing

    # spawn, not fork: the caller may hold threads (torch, DALI) that a forked child would inherit locked.
    return multiprocessing.get_context("spawn").Pool(workers)


def build_command(src, out, options: dict) -> list[str]:
    """The CLI call that rebuilds this dataset (recorded in the manifest)."""
    command = ["python", "scripts/make_shards.py"]
    command += ["--synthetic", str(options["synthetic"])] if options["synthetic"] else ["--src", str(src)]
    command += ["--out", str(out)]
    for name, value in options.items():
        if name in ("synthetic", "progress", "command", "workers") or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            command += [flag] if value else []
        else:
            command += [flag, str(value)]
    return command


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists():
        if not overwrite:
            raise ShardsError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
        if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise ShardsError(f"refusing to overwrite {out}: it is not empty and has no {MANIFEST_NAME}, so it is "
                              f"not a shards folder this tool wrote; remove it yourself or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if not overwrite:
            raise ShardsError(f"output {out} appeared while converting; pass --overwrite or choose another --out")
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def make_shards(src: Path | None, out: Path, *, synthetic: int = 0, synthetic_size: int = DEFAULT_SYNTHETIC_SIZE,
                max_side: int = DEFAULT_MAX_SIDE, quality: int = DEFAULT_QUALITY, shard_mb: float = DEFAULT_SHARD_MB,
                min_shards: int = DEFAULT_MIN_SHARDS, val_fraction: float = 0.1, carve_val: bool | None = None,
                seed: int = 0, workers: int = 1, overwrite: bool = False, strict: bool = False,
                progress: bool = True, command: list[str] | None = None, timings: dict | None = None) -> dict:
    """Convert `src` (Kaggle layout) or `synthetic` generated images into shards under `out`; return the manifest.

    `carve_val`: None carves val from train by patient when the source val split is missing or has fewer
    than 100 images; True always does; False never does. Raises `ShardsError` for unusable input or
    output paths, and with `strict` when any input was rejected (nothing is written then). `timings`, when
    given, is filled with wall seconds per stage (`scan`, `hash`, `convert`, `write`, `total`); they are kept
    out of the manifest so reruns stay byte-identical.
    """
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    started = clock

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 4)
        clock = now

    out = Path(out)
    options = {"synthetic": synthetic, "synthetic_size": synthetic_size if synthetic else None, "max_side": max_side,
               "quality": quality, "shard_mb": shard_mb, "min_shards": min_shards, "val_fraction": val_fraction,
               "carve_val": carve_val, "seed": seed, "workers": workers, "overwrite": overwrite, "strict": strict}
    if (src is None) == (not synthetic):
        raise ShardsError("give exactly one of --src PATH (Kaggle chest_xray layout) or --synthetic N")
    if max_side < 0 or not 1 <= quality <= 100 or shard_mb <= 0 or min_shards < 1 or not 0 <= val_fraction < 1:
        raise ShardsError(f"invalid options: max_side={max_side} (>= 0), quality={quality} (1-100), "
                          f"shard_mb={shard_mb} (> 0), min_shards={min_shards} (>= 1), val_fraction={val_fraction} "
                          f"([0, 1))")
    skipped: list[dict] = []
    rejected: list[dict] = []
    duplicates: list[dict] = []
    if synthetic:
        try:
            items = plan_synthetic(synthetic, seed=seed)
        except ValueError as exc:
            raise ShardsError(str(exc)) from None
        entries = [Entry(i.path, i.split, i.label, i.patient, i.subtype, i.split, synthetic_index=i.index)
                   for i in items]
        source = "synthetic"
        num_inputs = len(entries)
    else:
        root, entries, skipped = scan_source(Path(src))
        source = _display(root.resolve())
        num_inputs = len(entries) + len(skipped)
    tmp = _prepare_out(out, overwrite)
    lap("scan")
    pool = None
    try:
        pool = _start_pool(workers)
        if not synthetic:
            hashed = list(_imap(_hash_task, entries, pool, workers, "hash", progress))
            readable = []
            hashes = []
            for entry, (digest, error) in zip(entries, hashed, strict=True):
                if error:
                    rejected.append({"path": entry.path, "reason": error})
                else:
                    readable.append(entry)
                    hashes.append(digest)
            entries, duplicates = remove_duplicates(readable, hashes)
            source_val = sum(e.split == "val" for e in entries)
            if carve_val or (carve_val is None and source_val < MIN_SOURCE_VAL and val_fraction > 0):
                # The tiny source val split joins train first, so every image can land in the carved val.
                entries = [replace(e, split="train") if e.split == "val" else e for e in entries]
                entries = carve_val_by_patient(entries, val_fraction, seed)
        lap("hash")
        splits = [s for s in SPLITS if any(e.split == s for e in entries)]
        ordered = []
        for split_number, split in enumerate(SPLITS):
            members = sorted((e for e in entries if e.split == split), key=lambda e: e.path)
            order = np.random.default_rng([seed, split_number]).permutation(len(members))
            ordered += [members[i] for i in order]
        tasks = [(e, max_side, quality, seed, synthetic_size) for e in ordered]
        accepted: dict[str, list] = {s: [] for s in splits}
        histograms = {s: np.zeros(256, np.int64) for s in splits}
        spools = {s: tmp / f"_spool-{s}.bin" for s in splits}
        handles = {s: open(spools[s], "wb") for s in splits}  # noqa: SIM115 - closed in finally below
        passthrough = 0
        try:
            for entry, result in zip(ordered, _imap(_convert_task, tasks, pool, workers, "convert", progress), strict=True):
                if result[0] == "rejected":
                    rejected.append({"path": entry.path, "reason": result[1]})
                    continue
                _, encoded, info = result
                handle = handles[entry.split]
                accepted[entry.split].append((entry, handle.tell(), len(encoded), info))
                handle.write(encoded)
                histograms[entry.split] += np.asarray(info.pop("histogram"), np.int64)
                passthrough += info["passthrough"]
        finally:
            for handle in handles.values():
                handle.close()
        lap("convert")
        if strict and rejected:
            listing = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:10])
            raise ShardsError(f"--strict: {len(rejected)} input(s) rejected, nothing written to {out}: {listing}"
                              f"{' ...' if len(rejected) > 10 else ''}")
        split_info = {}
        for split in splits:
            shards = _write_split_shards(tmp, split, accepted[split], spools[split], shard_mb, min_shards)
            spools[split].unlink()
            members = [entry for entry, _, _, _ in accepted[split]]
            split_info[split] = {
                "samples": len(members),
                "per_class": {name: sum(e.label == i for e in members) for i, name in enumerate(LABELS)},
                "per_subtype": dict(sorted(Counter(e.subtype for e in members).items())),
                "patients": len({e.patient for e in members}),
                "shards": shards,
            }
        stats_split = "train" if histograms.get("train", np.zeros(1)).sum() else None
        stats_hist = histograms["train"] if stats_split else sum(histograms.values(), np.zeros(256, np.int64))
        stats = {**_pixel_stats(stats_hist), "split": stats_split or "all"} if stats_hist.sum() else None
        rejected.sort(key=lambda r: r["path"])
        removed = sum(len(d["removed"]) for d in duplicates)
        sharded = sum(info["samples"] for info in split_info.values())
        manifest = {
            "version": MANIFEST_VERSION,
            "labels": list(LABELS),
            "command": command if command is not None else build_command(src, out, options),
            "args": {k: v for k, v in options.items()},
            "source": source,
            "splits": split_info,
            "stats": stats,
            "inputs": {"files": num_inputs, "sharded": sharded, "rejected": len(rejected), "skipped": len(skipped),
                       "duplicates_removed": removed, "passthrough": passthrough},
            "patient_overlap": patient_overlap([e for s in splits for e, _, _, _ in accepted[s]]),
            "rejected": rejected,
            "skipped": skipped,
            "duplicates": duplicates,
        }
        if sharded + len(rejected) + len(skipped) + removed != num_inputs:
            raise AssertionError(f"accounting bug: {sharded} sharded + {len(rejected)} rejected + {len(skipped)} "
                                 f"skipped + {removed} duplicates != {num_inputs} inputs")
        # The manifest goes last: a folder with a manifest.json is a complete one.
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        _publish(tmp, out, overwrite)
        lap("write")
        timings["total"] = round(time.perf_counter() - started, 4)
    finally:
        if pool is not None:
            pool.terminate()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def format_summary(manifest: dict, out: Path | str) -> str:
    """Human summary printed by the CLI."""
    lines = [f"shards: {out}  (source: {manifest['source']})"]
    for split, info in manifest["splits"].items():
        classes = ", ".join(f"{name} {count}" for name, count in info["per_class"].items())
        lines.append(f"  {split:5s} {info['samples']:6d} samples ({classes}); {info['patients']} patients; "
                     f"{len(info['shards'])} shards, {sum(s['bytes'] for s in info['shards']) / 2**20:.1f} MiB")
    counts = manifest["inputs"]
    lines.append(f"  inputs {counts['files']}: sharded {counts['sharded']} ({counts['passthrough']} passed through), "
                 f"rejected {counts['rejected']}, skipped {counts['skipped']}, duplicates removed "
                 f"{counts['duplicates_removed']}")
    for record in manifest["rejected"][:10]:
        lines.append(f"    rejected {record['path']}: {record['reason']}")
    if len(manifest["rejected"]) > 10:
        lines.append(f"    ... {len(manifest['rejected']) - 10} more in manifest.json")
    if manifest["patient_overlap"]:
        lines.append(f"  note: patient ids shared between official splits: {manifest['patient_overlap']}")
    if manifest["stats"]:
        lines.append(f"  pixel mean {manifest['stats']['mean']:.4f} std {manifest['stats']['std']:.4f} "
                     f"({manifest['stats']['split']})")
    return "\n".join(lines)
