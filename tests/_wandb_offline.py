"""Read an offline W&B run back, so tests can check what W&B would show without any network.

wandb >= 0.2x writes offline runs only as a `.wandb` transaction log (no wandb-summary.json) and no
longer ships a Python reader for it; the log is LevelDB-style: a 7-byte file header, 32 KiB blocks,
records of (crc32 u32, length u16, type u8) + payload, type 1 full / 2 first / 3 middle / 4 last.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path


def wandb_records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, header = 32768, 7
    pos, pending = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def offline_run(run_file: Path) -> tuple[dict, dict, list[dict]]:
    """(summary, run info, history rows) of one `run-*.wandb` file."""
    summary, run_info, history = {}, {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            run_info = {"project": record.run.project, "job_type": record.run.job_type,
                        "name": record.run.display_name, "group": record.run.run_group, "id": record.run.run_id}
    return summary, run_info, history


def offline_run_summary(wandb_root: Path) -> tuple[dict, dict]:
    """Summary and run info of the single offline run under `wandb_root/wandb/`."""
    (run_file,) = wandb_root.glob("wandb/offline-run-*/run-*.wandb")
    summary, run_info, _ = offline_run(run_file)
    return summary, run_info
