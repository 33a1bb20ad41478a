"""Stage 5, write: a split's converted images -> `<split>/<split>-NNNNNN.tar` + DALI `.idx`, and their records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipelines.make_shards.scan import Entry
from pipelines.manifest import LABELS, sha256_file

DEFAULT_MIN_SHARDS = 8
DEFAULT_SHARD_MB = 64.0
# Fixed tar mtime (2000-01-01): byte-identical reruns need it.
TAR_MTIME = 946_684_800


def write_index(tar_path: Path, index_path: Path) -> None:
    """The `.idx` DALI's `fn.readers.webdataset(index_paths=...)` reads, written by DALI's own `wds2idx`."""
    from wds2idx import IndexCreator  # ships with the nvidia-dali wheel

    creator = IndexCreator(str(tar_path), str(index_path), verbose=False)
    try:
        creator.create_index()
    finally:
        creator.close()


def sample_meta(key: str, entry: Entry, info: dict) -> dict:
    """The `<key>.json` member: where the image came from and its size before and after conversion; for a
    labels CSV the cell(s) the label came from, for DICOM the header facts `dicom.decode` reports."""
    meta = {"key": key, "source": entry.path, "label": entry.label, "label_name": LABELS[entry.label],
            "patient": entry.patient, "subtype": entry.subtype, "source_split": entry.source_split,
            "width": info["width"], "height": info["height"], "mode": info["mode"], "orientation": info["orientation"],
            "stored_width": info["stored_width"], "stored_height": info["stored_height"]}
    if entry.source_label:
        meta["source_label"] = entry.source_label
    if "dicom" in info:
        meta["dicom"] = info["dicom"]
    return meta


def write_split(tmp: Path, split: str, accepted: list[tuple[Entry, int, int, dict]], spool: Path,
                shard_mb: float, min_shards: int) -> list[dict]:
    """Write one split's shards under `tmp/<split>/`; return their manifest records (in key order)."""
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
                    sink.write({"__key__": key, "jpg": spool_file.read(length), "cls": str(entry.label).encode(),
                                "json": json.dumps(sample_meta(key, entry, info), sort_keys=True).encode()})
            write_index(tmp / tar_rel, tmp / index_rel)
            shards.append({"tar": tar_rel, "index": index_rel, "samples": len(chunk),
                           "bytes": (tmp / tar_rel).stat().st_size, "sha256": sha256_file(tmp / tar_rel),
                           "index_sha256": sha256_file(tmp / index_rel)})
    return shards
