"""Reading and verifying a shards folder written by `scripts/make_shards.py`.

`load_manifest(dir)` is what every consumer calls first; `verify_shards(dir)` re-hashes every shard
against the manifest and reads every sample twice, once with `webdataset` and once with DALI's CPU
reader through the `.idx` index, so a tampered, truncated or mis-indexed shard is named before a
multi-hour job trips over it. Command line: `python scripts/verify_shards.py shards/NAME`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
LABELS = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("version", "labels", "command", "args", "source", "splits", "stats", "rejected", "skipped",
                 "duplicates")
FIX_HINT = ("build it with `python scripts/make_shards.py --src PATH/chest_xray --out {dir}` "
            "(or `--synthetic 1200 --out {dir}` for the synthetic set)")


class ShardsError(FileNotFoundError, ValueError):
    """A shards folder that is missing, incomplete or does not match its manifest.

    Subclasses both `FileNotFoundError` and `ValueError` so callers can catch either the "not there"
    or the "not valid" family; the message always names the path and how to fix it.
    """


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(shards_dir: str | Path) -> dict:
    """Return the parsed `manifest.json` of a shards folder, checked for the keys consumers rely on."""
    shards_dir = Path(shards_dir)
    path = shards_dir / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not shards_dir.exists() else f"has no {MANIFEST_NAME} (incomplete or not a shards folder)"
        raise ShardsError(f"shards folder {shards_dir} {what}: {FIX_HINT.format(dir=shards_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardsError(f"cannot read {path}: {exc}; rebuild it: {FIX_HINT.format(dir=shards_dir)}") from exc
    missing = [key for key in REQUIRED_KEYS if key not in manifest] if isinstance(manifest, dict) else ["(all)"]
    if missing:
        raise ShardsError(f"{path} lacks {missing}; rebuild it: {FIX_HINT.format(dir=shards_dir)}")
    if manifest["version"] != MANIFEST_VERSION:
        raise ShardsError(f"{path} has manifest version {manifest['version']!r}, this code reads "
                          f"{MANIFEST_VERSION}; rebuild it: {FIX_HINT.format(dir=shards_dir)}")
    return manifest


def read_index(index_path: Path) -> list[list[tuple[str, int, int]]]:
    """Parse a DALI `wds2idx` index: `v1.2 N` then one line per sample of `ext offset size [name]` groups."""
    lines = index_path.read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != "v1.2" or not header[1].isdigit():
        raise ShardsError(f"{index_path}: not a DALI v1.2 index (header {lines[:1]!r})")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) % 4:
            raise ShardsError(f"{index_path}:{number}: expected `ext offset size name` groups, got {line!r}")
        samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)])
    if len(samples) != int(header[1]):
        raise ShardsError(f"{index_path}: header says {header[1]} samples, {len(samples)} lines follow")
    return samples


def _shard_records(shards_dir: Path, manifest: dict, split: str, check_hashes: bool) -> list[dict]:
    """Check one split's files against the manifest; return its shard entries with absolute paths."""
    records = []
    for shard in manifest["splits"][split]["shards"]:
        tar, index = shards_dir / shard["tar"], shards_dir / shard["index"]
        for path in (tar, index):
            if not path.is_file():
                raise ShardsError(f"bad shard {tar}: {path} is missing; rebuild: {FIX_HINT.format(dir=shards_dir)}")
        if tar.stat().st_size != shard["bytes"]:
            raise ShardsError(f"bad shard {tar}: {tar.stat().st_size} bytes, manifest says {shard['bytes']}")
        if check_hashes and sha256_file(tar) != shard["sha256"]:
            raise ShardsError(f"bad shard {tar}: sha256 differs from the manifest (modified or corrupt)")
        if check_hashes and "index_sha256" in shard and sha256_file(index) != shard["index_sha256"]:
            raise ShardsError(f"bad shard {tar}: its index {index} differs from the manifest")
        if len(read_index(index)) != shard["samples"]:
            raise ShardsError(f"bad shard {tar}: index {index} lists a different sample count than the "
                              f"manifest ({shard['samples']})")
        records.append({**shard, "tar_path": tar, "index_path": index})
    return records


def _shard_of(records: list[dict], position: int) -> Path:
    for record in records:
        if position < record["samples"]:
            return record["tar_path"]
        position -= record["samples"]
    return records[-1]["tar_path"]


def _read_with_webdataset(records: list[dict], split: str) -> list[tuple[str, int, dict]]:
    import webdataset as wds

    key_pattern = re.compile(rf"^{split}-\d{{8}}$")
    samples = []
    for record in records:
        tar = record["tar_path"]
        dataset = wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)
        count = 0
        try:
            for sample in dataset:
                key = sample["__key__"]
                if not key_pattern.match(key) or set(sample) - {"__key__", "__url__", "__local_path__"} != {
                        "jpg", "cls", "json"}:
                    raise ShardsError(f"bad shard {tar}: sample {key!r} has components {sorted(sample)}, "
                                      f"expected <{split}-NNNNNNNN>.{{jpg,cls,json}}")
                label = int(sample["cls"])
                meta = json.loads(sample["json"])
                if meta.get("label") != label or meta.get("key") != key or sample["jpg"][:2] != b"\xff\xd8":
                    raise ShardsError(f"bad shard {tar}: sample {key} disagrees with itself (label {label}, "
                                      f"json label {meta.get('label')}, json key {meta.get('key')})")
                samples.append((key, label, meta))
                count += 1
        except ShardsError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is reported against the shard
            raise ShardsError(f"bad shard {tar}: webdataset cannot read it: {exc}") from exc
        if count != record["samples"]:
            raise ShardsError(f"bad shard {tar}: webdataset reads {count} samples, manifest says {record['samples']}")
    return samples


def _read_with_dali(records: list[dict], expected: list[tuple[str, int, dict]]) -> None:
    """Read and decode every sample through the `.idx` files with DALI's CPU operators."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    total = len(expected)
    batch_size = max(1, min(64, total))

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def read_all():
        jpegs, labels, metas = fn.readers.webdataset(
            paths=[str(r["tar_path"]) for r in records], index_paths=[str(r["index_path"]) for r in records],
            ext=["jpg", "cls", "json"], missing_component_behavior="error", random_shuffle=False,
            name="reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
        return images.shape(), labels, metas

    try:
        pipe = read_all()
        pipe.build()
        epoch_size = pipe.reader_meta("reader")["epoch_size"]
    except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError subclasses with the cause
        raise ShardsError(f"bad shard in {[str(r['tar_path']) for r in records]}: DALI cannot open them "
                          f"through their .idx files: {exc}") from exc
    if epoch_size != total:
        raise ShardsError(f"bad index among {[str(r['index_path']) for r in records]}: DALI sees {epoch_size} "
                          f"samples, manifest says {total}")
    position = 0
    while position < total:
        try:
            shapes, labels, metas = pipe.run()
        except Exception as exc:  # noqa: BLE001
            raise ShardsError(f"bad shard {_shard_of(records, position)}: DALI fails near sample {position}: "
                              f"{exc}") from exc
        for i in range(min(batch_size, total - position)):
            key, label, meta = expected[position]
            dali_label = int(bytes(np.asarray(labels[i])))
            dali_meta = json.loads(bytes(np.asarray(metas[i])))
            shape = tuple(int(s) for s in np.asarray(shapes[i]))
            if (dali_label, dali_meta) != (label, meta) or shape != (meta["stored_height"], meta["stored_width"], 1):
                raise ShardsError(f"bad shard {_shard_of(records, position)}: DALI reads sample {position} as "
                                  f"{dali_meta.get('key')} label {dali_label} shape {shape}; webdataset reads "
                                  f"{key} label {label} size {meta['stored_height']}x{meta['stored_width']}")
            position += 1
    del pipe


def verify_shards(shards_dir: str | Path, *, dali: bool = True, check_hashes: bool = True) -> dict:
    """Re-hash every shard and read every sample with webdataset and DALI; raise `ShardsError` on a mismatch.

    Returns `{split: samples}` as read. The error names the bad shard and what differs.
    """
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    counts = {}
    for split, info in manifest["splits"].items():
        records = _shard_records(shards_dir, manifest, split, check_hashes)
        samples = _read_with_webdataset(records, split)
        if len(samples) != info["samples"]:
            raise ShardsError(f"split {split} of {shards_dir}: {len(samples)} samples read, manifest says "
                              f"{info['samples']}")
        per_class = {name: 0 for name in manifest["labels"]}
        for _, label, _ in samples:
            per_class[manifest["labels"][label]] += 1
        if per_class != info["per_class"]:
            raise ShardsError(f"split {split} of {shards_dir}: per-class counts {per_class} differ from the "
                              f"manifest {info['per_class']}")
        expected_keys = [f"{split}-{i:08d}" for i in range(len(samples))]
        if [key for key, _, _ in samples] != expected_keys:
            raise ShardsError(f"split {split} of {shards_dir}: keys are not {split}-00000000.. in shard order")
        if dali and samples:
            _read_with_dali(records, samples)
        counts[split] = len(samples)
    return counts
