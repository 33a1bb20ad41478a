"""Planting faults in a copy of a shards folder: manifest edits, hashes that agree again, broken tar headers."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from pipelines.manifest import sha256_file


def edit_manifest(shards_dir: Path, edit) -> None:
    """Apply `edit(manifest_dict)` to the folder's manifest.json."""
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    edit(manifest)
    (shards_dir / "manifest.json").write_text(json.dumps(manifest))


def rehash(shards_dir: Path) -> None:
    """Make the manifest's sizes and hashes agree with the files, so only the other checks can catch a change."""
    def edit(manifest):
        for info in manifest["splits"].values():
            for shard in info["shards"]:
                shard["bytes"] = (shards_dir / shard["tar"]).stat().st_size
                shard["sha256"] = sha256_file(shards_dir / shard["tar"])
                shard["index_sha256"] = sha256_file(shards_dir / shard["index"])
    edit_manifest(shards_dir, edit)


def drop_one_sample(split: str):
    """A manifest edit: the split's first shard (and the split) count one sample fewer than they hold."""
    def edit(manifest):
        manifest["splits"][split]["shards"][0]["samples"] -= 1
        manifest["splits"][split]["samples"] -= 1
    return edit


def garble_header(tar: Path, member: int) -> None:
    """Overwrite the checksum field of the tar header of member number `member`, so the header does not parse."""
    with tarfile.open(tar) as archive:
        offset = archive.getmembers()[member].offset
    data = bytearray(tar.read_bytes())
    data[offset + 148:offset + 156] = b"garbage!"
    tar.write_bytes(bytes(data))
