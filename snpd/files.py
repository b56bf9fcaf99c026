"""Small file helpers: bounded reads of user-supplied files, and crash-safe replacement
(a reader sees the old file or the new one, never half).

The writers are safe in a directory another user can write, because root uses them
there: snpd-probe writes into /run/snpd, which user snpd owns, and root may run the
cache or the emulator on snpd's directories. Nothing is resolved through a name such
a user could have planted. The directory is opened once with O_NOFOLLOW, and every
later step is relative to that descriptor. The temporary file has an unpredictable
name and is created with O_EXCL|O_NOFOLLOW, so it is always a fresh inode of the
writer's. Its mode and owner are set on the descriptor, never by path. rename(2)
replaces whatever sits at the final name, a planted symlink included, without
following it.
"""

from __future__ import annotations

import errno
import os
import stat

from snpd.errors import ConfigError, InputFileError

# snpctl report reads and writes its files with this module within a 25 ms budget:
# pathlib, re, contextlib and typing are imported where needed, not here (pathlib and
# the re it imports alone take 10 ms).
TYPE_CHECKING = False  # see snpd/__init__.py
if TYPE_CHECKING:
    import re
    from pathlib import Path
    from typing import Any, Dict, Optional, Tuple, Union

    StrPath = Union[str, "os.PathLike[str]"]

TMP_SUFFIX = ".tmp"
_TMP_PATTERN: list[re.Pattern[str]] = []
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_ATTEMPTS = 16


def _tmp_re() -> re.Pattern[str]:
    """``.NAME.<digits>.tmp``: this module's random names, and older versions' pid ones."""
    if not _TMP_PATTERN:
        import re  # lazy: see the note at the top (snpctl report's 25 ms)

        _TMP_PATTERN.append(re.compile(r"^\..+\.[0-9]+" + re.escape(TMP_SUFFIX) + r"$"))
    return _TMP_PATTERN[0]


if not TYPE_CHECKING:  # so that mypy still knows every other name here
    def __getattr__(name: str) -> Any:
        if name == "_TMP_RE":  # the module's attribute, compiled on first use
            return _tmp_re()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def temporary_name(name: str) -> str:
    """``.NAME.<64 random bits>.tmp``. Another user cannot predict it (a pid they can),
    and remove_stale_temporaries recognizes it."""
    return f".{name}.{int.from_bytes(os.urandom(8), 'big')}{TMP_SUFFIX}"


def _open_dir(name: StrPath, shown: StrPath, *, follow: bool = False,
              dir_fd: Optional[int] = None) -> int:
    """Open a directory; a symlink at ``name`` is refused unless ``follow``."""
    flags = _DIR_FLAGS if follow else _DIR_FLAGS | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if not follow and exc.errno in (errno.ELOOP, errno.ENOTDIR) \
                and _is_symlink(name, dir_fd):
            raise OSError(errno.ELOOP, "is a symbolic link; refusing to follow it",
                          os.fspath(shown)) from None
        raise


def _is_symlink(name: StrPath, dir_fd: Optional[int]) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_directory(path: StrPath, *, within: Optional[StrPath] = None, create: bool = True,
                   dir_mode: int = 0o777) -> int:
    """A descriptor of the directory ``path``, reached through no symlink an attacker
    could have planted.

    Without ``within``, only the last component is checked (O_NOFOLLOW). The path
    above it is the caller's choice. With ``within``, an ancestor the caller trusts
    (it is followed as given, so an administrator's symlink there keeps working),
    each component below it is created with ``dir_mode`` (less the umask) if missing
    and ``create`` is set, then opened with O_NOFOLLOW relative to its parent's
    descriptor. A link planted anywhere below ``within`` is then refused, never
    followed.

    Raises OSError (ELOOP for a symlink), or ValueError for a path not below ``within``.
    """
    if within is None:
        return _open_dir(path, path)
    # lazy: see the note at the top (snpctl report's 25 ms)
    import contextlib
    from pathlib import Path

    parts = Path(path).relative_to(within).parts
    if ".." in parts:
        raise ValueError(f"{path} climbs out of {within}")
    fd = _open_dir(within, within, follow=True)
    try:
        shown = Path(within)
        for part in parts:
            shown = shown / part
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_mode, dir_fd=fd)
            child = _open_dir(part, shown, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, exact_mode: bool = False,
                 owner: Optional[Tuple[int, int]] = None,
                 within: Optional[Path] = None) -> None:
    """Replace ``path`` with ``data``. The data goes to a fresh temporary file in the
    same directory, which is fsynced and renamed over ``path``; then the directory is
    fsynced.

    The file is created with ``mode`` less the umask, as open(2) does. With
    ``exact_mode`` it then gets exactly ``mode``, for a writer whose umask (a unit's
    UMask=, say) would hide the file from its reader. ``owner`` is (uid, gid). Mode
    and owner are set on the descriptor (fchmod, fchown), never by path, once the
    data is written. A symlinked directory is refused (see open_directory, also for
    ``within``, which creates the missing directories between it and ``path``). A
    symlink at ``path`` is replaced, not followed.

    Raises OSError. On failure the temporary file is removed if it is still the one
    created here.
    """
    dfd = open_directory(path.parent, within=within)
    try:
        _replace_at(dfd, path.name, data, mode, exact_mode, owner)
    finally:
        os.close(dfd)


def write_named(name: str, data: bytes, mode: int = 0o644) -> None:
    """``atomic_write(Path(name), data, mode, within=Path(name).parent)``: replace the
    file a user named; the directory named is followed as given (the user's own
    choice), a link planted at the file's name is not. A plain name (no empty or
    ``.`` component, no trailing slash) is split without pathlib, which costs snpctl
    report a third of its start-up budget; the result is the same."""
    split = _plain_split(name)
    if split is None:
        from pathlib import Path  # lazy: see the note at the top (snpctl report's 25 ms)

        path = Path(name)
        atomic_write(path, data, mode, within=path.parent)
        return
    parent, base = split
    dfd = _open_dir(parent, parent, follow=True)
    try:
        _replace_at(dfd, base, data, mode, False, None)
    finally:
        os.close(dfd)


def _plain_split(name: str) -> Optional[Tuple[str, str]]:
    """(str(Path(name).parent), Path(name).name) where they are the plain split of the
    text at its last slash, else None."""
    parts = name.split("/")  # parts[0] is "" for an absolute name: the root
    if not name or "\0" in name or parts[0] == "." or any(p in ("", ".") for p in parts[1:]):
        return None
    head, _, base = name.rpartition("/")
    return (head or ("/" if name.startswith("/") else ".")), base


def _replace_at(dfd: int, name: str, data: bytes, mode: int, exact_mode: bool,
                owner: Optional[Tuple[int, int]]) -> None:
    """atomic_write's work once the directory is open as ``dfd``."""
    tmp, fd, created = _create_temporary(dfd, name, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if owner is not None:
                os.fchown(fd, *owner)
            if exact_mode:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        _remove_if_same(dfd, tmp, created)
        raise
    os.fsync(dfd)


def unlink_within(path: Path, within: Path) -> None:
    """Unlink ``path``, reached from ``within`` through no planted link (see
    open_directory). A symlink at ``path`` itself is removed, never its target.
    Raises OSError."""
    dfd = open_directory(path.parent, within=within, create=False)
    try:
        os.unlink(path.name, dir_fd=dfd)
    finally:
        os.close(dfd)


def _create_temporary(dfd: int, name: str, mode: int) -> Tuple[str, int, os.stat_result]:
    """A new temporary file next to ``name``: its name, descriptor and identity.
    O_EXCL|O_NOFOLLOW means nothing planted at the name is ever opened, and a name
    that is taken is simply drawn again."""
    for _ in range(_TMP_ATTEMPTS):
        tmp = temporary_name(name)
        try:
            fd = os.open(tmp, _TMP_FLAGS, mode & 0o7777, dir_fd=dfd)
        except FileExistsError:
            continue
        try:
            return tmp, fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            import contextlib  # lazy: see the note at the top

            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    raise FileExistsError(errno.EEXIST,
                          f"no free temporary name after {_TMP_ATTEMPTS} attempts", name)


def _remove_if_same(dfd: int, name: str, created: os.stat_result) -> None:
    """Unlink ``name`` only if it is still the file this process created there."""
    import contextlib  # lazy: see the note at the top

    with contextlib.suppress(OSError):
        if os.path.samestat(os.lstat(name, dir_fd=dfd), created):
            os.unlink(name, dir_fd=dfd)


def chmod_own(path: StrPath, mode: int, file_type: int) -> None:
    """chmod a file this process just created by name (a socket that bind(2) made,
    say), in a directory another user may write.

    The name is opened with O_PATH|O_NOFOLLOW and the mode is changed through
    /proc/self/fd. os.chmod has no follow_symlinks=False on Linux before Python 3.13.
    The file must be a ``file_type`` (stat.S_IFSOCK, ...) owned by this process's euid
    with one link, or OSError(EPERM) is raised and nothing changes. So a symlink or a
    hard link swapped in after the file was made is never chmodded.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_IFMT(st.st_mode) != file_type or st.st_uid != os.geteuid() \
                or st.st_nlink != 1:
            raise OSError(errno.EPERM, "was replaced before its mode could be set",
                          os.fspath(path))
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path) -> int:
    """Remove temporaries a crash left behind (``.NAME.<digits>.tmp``), and return
    how many. The walk is by descriptor and never descends through a symlink (other
    than ``directory`` itself), so a link planted in the tree cannot point it
    elsewhere."""
    removed = 0
    try:
        top = _open_dir(directory, directory, follow=True)
    except FileNotFoundError:
        return 0
    try:
        for _, _, files, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for name in files:
                if _tmp_re().match(name):
                    try:
                        os.unlink(name, dir_fd=dfd)
                        removed += 1
                    except OSError:
                        pass
    finally:
        os.close(top)
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


def read_toml(path: Union[str, os.PathLike[str]], *, missing_ok: bool = False,
              limit: int = 1 << 20) -> Optional[Dict[str, Any]]:
    """A TOML file of at most ``limit`` bytes as a dict; every failure a ConfigError
    that starts with the path. A file that does not exist is None with
    ``missing_ok``, else an error. Opened with O_NONBLOCK so that a FIFO named by
    mistake cannot hang a start, and refused unless it is a regular file. A UTF-8
    byte order mark, which some editors write, is ignored."""
    # Here, not at the top: snpctl imports this module and parses no TOML on its
    # fast paths (snpd.schema pulls in json, re, enum and typing).
    from snpd.schema import parse_toml

    source = os.fspath(path)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"{source}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot open: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{source}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{source}: larger than {limit} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (bad byte at offset {exc.start})") from None
    return parse_toml(text, source=source, limit=limit)
