"""Ground truth read straight from the tar files (no loader code), for the loader tests."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path


def split_labels(shards_dir: Path, split: str) -> dict[str, int]:
    """key -> label from every `<key>.cls` member of the split's tars listed in the manifest."""
    manifest = json.loads((Path(shards_dir) / "manifest.json").read_text())
    labels = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(Path(shards_dir) / shard["tar"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext == "cls":
                    labels[key] = int(tar.extractfile(member).read())
    return labels
