"""The output folder: everything is written to `<out>.tmp-<pid>` and renamed into place at the end.

`--overwrite` deletes only what this tool wrote: a folder whose manifest loads as this tool's format and
that holds nothing but `manifest.json` and `<split>/<split>-NNNNNN.{tar,idx}`. The source, a folder that
contains it and an existing folder inside it are never an output (a fresh folder inside it is), nor is a
file or a link. Temporary folders of a killed run (`<out>.tmp-<pid>`, `<out>.old-<pid>` of a process that
is gone, holding only this tool's files) are removed by the next run on the same `--out`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pipelines.manifest import MANIFEST_NAME, SPLITS, ShardsError, load_manifest

# Written first into every temporary folder, removed just before it is published: marks it as this tool's.
TMP_MARKER = ".make_shards-tmp"
_SHARD_FILE = re.compile(rf"^({'|'.join(SPLITS)})/\1-\d{{6}}\.(tar|idx)$")
_TMP_FILE = re.compile(rf"^_spool-({'|'.join(SPLITS)})\.bin$")


def _foreign_entry(folder: Path, temporary: bool) -> str | None:
    """The first entry under `folder` (relative path) that this tool would not have written; None if none."""
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                return rel
            if path.is_dir():
                if rel not in SPLITS:
                    return rel + "/"
            elif not (rel == MANIFEST_NAME or _SHARD_FILE.match(rel)
                      or (temporary and (rel == TMP_MARKER or _TMP_FILE.match(rel)))):
                return rel
    return None


def _not_ours(folder: Path) -> str | None:
    """Why `folder` is not a complete shards folder written by this tool; None when it is one."""
    try:
        load_manifest(folder)
    except ShardsError:
        return f"it has no {MANIFEST_NAME} of this tool's format"
    foreign = _foreign_entry(folder, temporary=False)
    return f"it holds {foreign!r}" if foreign else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: Path, src: Path | None, overwrite: bool) -> None:
    """Refuse an `--out` that is the source, contains it, sits in it (unless fresh), is not a folder, or is
    a folder this tool did not write; raises a one-line `ShardsError` naming the fix."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ShardsError(f"output {out} exists and is not a folder (a file or a link); choose another --out")
    if src is not None:
        source, target = Path(src).resolve(), out.resolve()
        if _inside(source, target):
            raise ShardsError(f"output {out} is the source {src} or contains it; choose an --out outside the source")
        if _inside(target, source) and out.exists():
            raise ShardsError(f"output {out} is an existing folder inside the source {src}; choose a new folder "
                              f"or one outside the source")
    if not out.exists():
        return
    if not overwrite:
        raise ShardsError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
    problem = _not_ours(out) if any(out.iterdir()) else None
    if problem:
        raise ShardsError(f"refusing to overwrite {out}: {problem}, so it is not a shards folder this tool wrote; "
                          f"remove it yourself or choose another --out")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Delete `<out>.tmp-<pid>` / `<out>.old-<pid>` folders left by a killed run of this tool; return them."""
    pattern = re.compile(rf"^{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    removed = []
    for path in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        match = pattern.match(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and _alive(pid):
            continue  # another run on the same --out is still writing it
        if match.group(1) == "tmp":
            ours = _foreign_entry(path, temporary=True) is None and (
                (path / TMP_MARKER).is_file() or not any(path.iterdir()) or _not_ours(path) is None)
        else:
            ours = _not_ours(path) is None
        if ours:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def prepare_out(out: Path) -> Path:
    """Remove stale temporary folders and return a new, marked one to write into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    (tmp / TMP_MARKER).write_text(f"make_shards pid {os.getpid()} writing {out.name}\n")
    return tmp


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`, replacing an `out` this tool wrote (checked again: it may have changed meanwhile)."""
    (tmp / TMP_MARKER).unlink()
    old = None
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ShardsError(f"output {out} appeared while converting; pass --overwrite or choose another --out")
        check_out(out, None, overwrite)
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
