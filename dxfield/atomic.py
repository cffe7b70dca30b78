"""Atomic file writes: nothing the user wrote is lost or left half-written.

Public helpers, for dxfield's caches and for any caller (dxtrain uses them for
checkpoints, metrics, pictures and JSON).  Every file the project writes (summary caches, checkpoints, metrics rewrites,
PNGs, JSON) goes through :func:`atomic_path`: the content is written to a
temporary file in the target's folder, flushed to disk, and renamed over the
target in one step; on any failure the temporary file is removed and the
previous target, if any, is untouched.
"""

from __future__ import annotations

__all__ = ["atomic_path", "atomic_write"]

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write, mode: str = "wb") -> None:
    """``write(fh)`` into ``path`` atomically (``mode`` "wb" or "w").

    Examples
    --------
    >>> import json, os, tempfile
    >>> from dxfield.atomic import atomic_write
    >>> path = os.path.join(tempfile.mkdtemp(), "run.json")
    >>> atomic_write(path, lambda fh: json.dump({"step": 1}, fh), "w")
    >>> open(path).read()
    '{"step": 1}'
    """
    with atomic_path(path) as tmp:
        with open(tmp, mode) as fh:
            write(fh)
