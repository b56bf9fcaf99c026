"""Small file helpers: bounded reads of user-supplied files, and crash-safe replacement
(a reader sees the old file or the new one, never half)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from snpd.errors import InputFileError

TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temporary file in the same directory, fsync, rename, fsync the directory.

    Raises OSError; the temporary file is removed on failure.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_stale_temporaries(directory: Path) -> int:
    """Remove temporaries a crash left behind (``.name.PID.tmp``); return how many."""
    removed = 0
    for tmp in directory.rglob(f".*{TMP_SUFFIX}"):
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def read_bounded(path: os.PathLike[str] | str, what: str, limit: int = 1 << 20) -> bytes:
    """Read a user-supplied file of at most ``limit`` bytes; InputFileError otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise InputFileError(f"{what} {path} is larger than {limit} bytes")
    return data
