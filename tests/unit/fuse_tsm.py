"""Mount a :class:`~snpd.emulator.configfs.TsmReportModel` with FUSE, so code that
uses plain os calls (the configfs backend's ``OsFsOps``) runs against the model.

Test-only. Needs the PyPI package fusepy (3.0.1), Debian's libfuse2, /dev/fuse
and root; :func:`mounted` raises :class:`Unavailable` when any is missing.

configfs semantics kept across the FUSE boundary: text attributes commit on each
write(2) (errors come back from write), binary ones (``inblob``) when the file is
closed (errors come back from close); a read generates the report once per open
file. ``direct_io`` and zero cache timeouts make every read reach the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

from snpd.emulator.configfs import INBLOB_MAX, TsmReportModel

BINARY = ("inblob",)


class Unavailable(Exception):
    """FUSE cannot be used here (module, library, device or privilege missing)."""


def _fuse() -> Any:
    """The fusepy module; importing it raises OSError when libfuse2 is missing."""
    try:
        import fuse  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except (ImportError, OSError) as exc:
        raise Unavailable(f"fusepy/libfuse2 not usable: {exc}") from None
    return fuse


class TsmFuse:
    """fusepy operations over the model; the mount point stands for ``model.root``."""

    use_ns = True  # fusepy otherwise warns (and pytest turns warnings into errors)

    def __init__(self, model: TsmReportModel) -> None:
        self.model = model
        self._files: Dict[int, Dict[str, Any]] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._started = time.time_ns()

    def __call__(self, op: str, *args: Any) -> Any:
        method = getattr(self, op, None)
        if method is None:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        return method(*args)

    def _path(self, path: str) -> str:
        return self.model.root if path == "/" else self.model.root + path

    # -- metadata --------------------------------------------------------------------

    def getattr(self, path: str, fh: Optional[int] = None) -> Dict[str, int]:
        kind = self.model.kind(self._path(path))
        if kind is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        mode = {"dir": stat.S_IFDIR | 0o755, "ro": stat.S_IFREG | 0o444,
                "wo": stat.S_IFREG | 0o200}[kind]
        return {"st_mode": mode, "st_nlink": 2 if kind == "dir" else 1, "st_size": 0,
                "st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": self._started,
                "st_mtime": self._started, "st_ctime": self._started}

    def readdir(self, path: str, fh: int) -> List[str]:
        return [".", "..", *self.model.listdir(self._path(path))]

    def mkdir(self, path: str, mode: int) -> int:
        self.model.mkdir(self._path(path))
        return 0

    def rmdir(self, path: str) -> int:
        self.model.rmdir(self._path(path))
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    def truncate(self, path: str, length: int, fh: Optional[int] = None) -> int:
        return 0

    # -- files -----------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        kind = self.model.kind(self._path(path))
        if kind is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if kind == "dir" or (writing and kind != "wo") or (not writing and kind != "ro"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        with self._lock:
            fh = self._next
            self._next += 1
            self._files[fh] = {"path": self._path(path), "data": None, "buffer": b"",
                               "dirty": False}
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        entry = self._files[fh]
        if entry["data"] is None:
            entry["data"] = self.model.read(entry["path"])
        data: bytes = entry["data"]
        return data[offset:offset + size]

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        entry = self._files[fh]
        name = entry["path"].rsplit("/", 1)[-1]
        if name in BINARY:
            if offset + len(data) > INBLOB_MAX:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            buf = entry["buffer"].ljust(offset, b"\0")
            entry["buffer"] = buf[:offset] + data + buf[offset + len(data):]
            entry["dirty"] = True
        else:
            self.model.write(entry["path"], data)
        return len(data)

    def flush(self, path: str, fh: int) -> int:
        entry = self._files.get(fh)
        if entry is not None and entry["dirty"]:
            entry["dirty"] = False
            self.model.write(entry["path"], entry["buffer"])
        return 0

    def release(self, path: str, fh: int) -> int:
        self._files.pop(fh, None)
        return 0


@contextlib.contextmanager
def mounted(model: TsmReportModel, mountpoint: str) -> Iterator[str]:
    """Serve ``model`` at ``mountpoint`` (an empty directory) until the block ends."""
    fuse = _fuse()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise Unavailable("FUSE needs root and /dev/fuse here")
    failure: List[BaseException] = []

    def serve() -> None:
        try:
            fuse.FUSE(TsmFuse(model), mountpoint, foreground=True, nothreads=True,
                      direct_io=True, attr_timeout=0, entry_timeout=0, negative_timeout=0)
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)

    thread = threading.Thread(target=serve, name="fuse-tsm", daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not os.path.ismount(mountpoint):
        if failure or not thread.is_alive() or time.monotonic() > deadline:
            thread.join(1)
            raise Unavailable(f"FUSE mount failed: {failure[0] if failure else 'timeout'}")
        time.sleep(0.01)
    try:
        yield mountpoint
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            if libc.umount2(mountpoint.encode(), 2) != 0:  # MNT_DETACH
                err = ctypes.get_errno()
                raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")
            thread.join(5)
        finally:
            _ignore_sigpipe(libc)


def _ignore_sigpipe(libc: Any) -> None:
    """libfuse2's fuse_main "restores" SIGPIPE to SIG_DFL on the way out (it found it
    ignored, as Python leaves it, and took that for its own doing): ignore it again,
    or the process's next write to a closed pipe or socket kills it."""
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signal.SIGPIPE, 1)  # SIG_IGN; Python's own view of SIGPIPE never changed
