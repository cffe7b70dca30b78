"""One run at a time per run folder: an advisory lock on ``<folder>/.lock``.

:class:`RunLock` takes an OS advisory lock (``fcntl.flock``; ``msvcrt.locking`` on
Windows) on the lock file for as long as the run lives, and writes its holder into
it (pid, host, start time, command).  A second run on the same folder is refused at
once with :class:`RunFolderBusy`, naming the folder and the holder.  The operating
system drops the lock when its process ends, however it ends, so a lock left by a
killed run (``kill -9``, a crash, a lost node) is free: the next run takes it over
and says so in its log.  A run that ends normally empties and removes the file.
Where the platform or the file system offers no locking, the run goes on unlocked
and says so.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

__all__ = ["LOCK", "RunFolderBusy", "RunLock", "holder_of"]

LOCK = ".lock"
_MSVCRT_OFFSET = 1 << 30  # Windows locks are mandatory: lock a byte far past the holder text, so others can read it


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


def holder_of(folder: str) -> dict:
    """What the lock file of ``folder`` says about its holder ({} when empty, missing or unreadable)."""
    try:
        with open(os.path.join(folder, LOCK)) as fh:
            return _parse(fh.read())
    except OSError:
        return {}


def _parse(text: str) -> dict:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if not info:
        return "holder unknown: it is starting, or it wrote nothing"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
            + (f": {info['command']}" if info.get("command") else ""))


class RunLock:
    """``with RunLock(folder, log):`` holds ``folder``'s lock for the block (creating the folder).

    Raises :class:`RunFolderBusy` when a live process holds it; ``log`` (a callable taking a
    line) hears about a lock taken over from a dead holder, or that no locking is available.
    """

    def __init__(self, folder: str, log=None):
        self.folder, self.path, self.log = folder, os.path.join(folder, LOCK), log or (lambda msg: None)
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        if fcntl is None and msvcrt is None:  # pragma: no cover - no such platform at hand
            self.log(f"note: no file locking on this platform; nothing stops a second run on {self.folder}")
            return
        for _ in range(20):  # the file can be removed by a holder that just finished: open it again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                _lock(fd)
            except BlockingIOError:
                info = _parse(_read(fd))
                os.close(fd)
                raise RunFolderBusy(
                    f"run folder {self.folder} is in use by another dxtrain run ({_describe(info)}; lock file "
                    f"{self.path}): wait for that run to end or stop it, or choose another --out") from None
            except OSError as exc:  # a file system without locks (some network mounts)
                os.close(fd)
                self.log(f"note: cannot lock {self.path} ({exc.strerror or exc}); nothing stops a second run on "
                         f"{self.folder}")
                return
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:  # pragma: no cover - someone keeps replacing the file
            raise RunFolderBusy(f"run folder {self.folder}: the lock file {self.path} keeps changing; is another "
                                "program removing it? Stop it, or choose another --out")
        previous = _parse(_read(fd))
        if previous:
            self.log(f"run folder {self.folder}: taking over the lock left by a run that ended without releasing "
                     f"it (killed?): {_describe(previous)}")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd

    def release(self) -> None:
        """Empty and remove the lock file, then drop the lock (closing the file drops it)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # should the removal fail, the next run finds no stale holder
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            if fcntl is None and msvcrt is not None:  # pragma: no cover - Windows
                try:
                    os.lseek(fd, _MSVCRT_OFFSET, os.SEEK_SET)
                    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
                except OSError:
                    pass
            os.close(fd)


def _lock(fd: int) -> None:
    """An exclusive lock on ``fd`` without waiting; BlockingIOError when another process holds it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    os.lseek(fd, _MSVCRT_OFFSET, os.SEEK_SET)  # pragma: no cover - Windows
    try:  # pragma: no cover
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as exc:  # pragma: no cover - Windows reports a held lock as EACCES/EDEADLOCK
        raise BlockingIOError(*exc.args) from None


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("utf-8", "replace")
    except OSError:
        return ""


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a finished holder removes it)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
