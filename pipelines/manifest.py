"""The manifest of a shards folder written by `scripts/make_shards.py`: its format, names and loader.

`load_manifest(dir)` is what every consumer calls first; `pipelines.shards` reads a split's shards through
it, and `pipelines.verify.verify_shards(dir)` checks a whole folder against it.
"""

from __future__ import annotations

import hashlib
import json
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
    if not isinstance(manifest["splits"], dict) or not all(isinstance(v, dict) for v in manifest["splits"].values()):
        raise ShardsError(f"{path}: 'splits' is not an object of split objects; rebuild it: "
                          f"{FIX_HINT.format(dir=shards_dir)}")
    if manifest["version"] != MANIFEST_VERSION:
        raise ShardsError(f"{path} has manifest version {manifest['version']!r}, this code reads "
                          f"{MANIFEST_VERSION}; rebuild it: {FIX_HINT.format(dir=shards_dir)}")
    return manifest
