"""The output folder: everything is written to `<out>.tmp-<pid>` and renamed into place at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipelines.manifest import MANIFEST_NAME, ShardsError


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Check that `out` may be written; return the empty temporary folder to write into."""
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


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if not overwrite:
            raise ShardsError(f"output {out} appeared while converting; pass --overwrite or choose another --out")
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
