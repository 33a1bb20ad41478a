"""Run train/run.py with every file opened for writing under $FULL_DISK failing as on a full disk.

    FULL_DISK=/abs/run/checkpoints python tests/train/_full_disk.py --config ... (train/run.py's arguments)

write() raises OSError(ENOSPC) without a file name, as the kernel's error reaches Python; nothing else changes.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import sys

FULL = os.path.join(os.path.abspath(os.environ["FULL_DISK"]), "")
_open = builtins.open


class _FullFile:
    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _full_disk_open(file, mode="r", *args, **kwargs):
    handle = _open(file, mode, *args, **kwargs)
    if isinstance(file, str | os.PathLike) and set(mode) & set("wax+") and os.path.abspath(file).startswith(FULL):
        return _FullFile(handle)
    return handle


builtins.open = io.open = _full_disk_open
sys.argv = ["train/run.py", *sys.argv[1:]]
sys.path.insert(0, os.getcwd())
runpy.run_path("train/run.py", run_name="__main__")
