"""configfs-tsm's report interface for SEV-SNP, as an in-process filesystem model
(docs/reference/abi.md §3.1-3.2, §7 item 6; the kernel's ``drivers/virt/coco/tsm.c`` and
``sev_report_new``).

:class:`TsmReportModel` offers the five operations of the configfs backend's
``FsOps`` (mkdir, rmdir, read, write, exists), raising OSError with the errno
the kernel gives. Reports come from the same :class:`EmulatedSevGuest` as the
ioctl path, so a wiped VMPCK, host throttling and the sequence numbers are
shared, as they are in the kernel.

Not modelled: the SVSM service provider (``service_provider = svsm`` reads fail
with EOPNOTSUPP instead of attesting through an SVSM), and partial reads and
writes (each operation is a whole open-read/write-close).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import posixpath
import re
import struct
import threading
import uuid
from typing import Callable, Dict, List, Optional, Tuple, Union

from snpd.abi.certtable import ENTRY
from snpd.abi.uapi import SEV_FW_BLOB_MAX_SIZE, FirmwareStatus
from snpd.emulator.kernel import EmulatedSevGuest

DEFAULT_ROOT = "/sys/kernel/config/tsm/report"
PROVIDER = b"sev_guest\n"
INBLOB_MAX = 64  # TSM_REPORT_INBLOB_MAX; SNP wants exactly this many
PRIVLEVEL_MAX = 3  # TSM_REPORT_PRIVLEVEL_MAX
REPORT_BUFFER = 4096  # sev_report_new's report_size
_U64 = (1 << 64) - 1
NULL_GUID = uuid.UUID(int=0)
_KSTRTOUINT = re.compile(r"\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\n?\Z")

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass
class _Item:
    """One report directory (struct tsm_report and its state)."""

    write_generation: int = 0
    read_generation: int = 0
    inblob: bytes = b""
    privlevel: int = 0
    service_provider: Optional[str] = None
    service_guid: uuid.UUID = NULL_GUID
    service_manifest_version: int = 0
    outblob: Optional[bytes] = None
    auxblob: Optional[bytes] = None
    manifestblob: Optional[bytes] = None


@dataclasses.dataclass(frozen=True)
class _Attr:
    readable: bool
    svsm_only: bool = False


_ATTRS: Dict[str, _Attr] = {
    "inblob": _Attr(False),
    "outblob": _Attr(True),
    "auxblob": _Attr(True),
    "manifestblob": _Attr(True, svsm_only=True),
    "provider": _Attr(True),
    "generation": _Attr(True),
    "privlevel": _Attr(False),
    "privlevel_floor": _Attr(True),
    "service_provider": _Attr(False, svsm_only=True),
    "service_guid": _Attr(False, svsm_only=True),
    "service_manifest_version": _Attr(False, svsm_only=True),
}


class TsmReportModel:
    """``/sys/kernel/config/tsm/report`` with the sev-guest provider behind it.

    One lock serializes everything, as ``tsm_rwsem`` (taken for writing whenever a
    report is generated) effectively does for the SNP provider.
    """

    def __init__(self, guest: EmulatedSevGuest, root: str = DEFAULT_ROOT) -> None:
        self.guest = guest
        self.root = posixpath.normpath(root)
        self._items: Dict[str, _Item] = {}
        self._lock = threading.RLock()

    @property
    def privlevel_floor(self) -> int:
        """sev_tsm_ops.privlevel_floor: the VMPCK the driver uses (kernel ≥ 6.11)."""
        return self.guest.vmpck_id

    @property
    def _svsm(self) -> bool:
        """The service_* attributes and manifestblob exist only under an SVSM."""
        return self.guest.firmware.config.guest_vmpl != 0

    def generation(self, path: PathLike) -> Tuple[int, int]:
        """(write, read) generation of a report directory, for tests."""
        with self._lock:
            item = self._item(path)
            return item.write_generation, item.read_generation

    def set_generation(self, path: PathLike, write: int, read: int) -> None:
        """Force the generation counters (tests of the wraparound EBUSY)."""
        with self._lock:
            item = self._item(path)
            item.write_generation, item.read_generation = write & _U64, read & _U64

    # -- FsOps -----------------------------------------------------------------------

    def kind(self, path: PathLike) -> Optional[str]:
        """"dir", "ro" or "wo" (an attribute's mode), or None when absent: for stat(2)."""
        with self._lock:
            kind, _, attr = self._resolve(path)
            if kind in ("root", "item"):
                return "dir"
            if kind == "attr" and attr is not None:
                return "ro" if _ATTRS[attr].readable else "wo"
            return None

    def listdir(self, path: PathLike) -> List[str]:
        """The entries of a directory (readdir)."""
        with self._lock:
            kind, _name, _ = self._resolve(path)
            if kind == "item":
                return [a for a, spec in _ATTRS.items() if self._svsm or not spec.svsm_only]
            if kind != "root":
                raise _err(errno.ENOTDIR if kind == "attr" else errno.ENOENT, path)
            norm = posixpath.normpath(os.fspath(path))
            if norm != self.root:
                return [self.root[len(norm.rstrip("/")) + 1:].split("/")[0]]
            return sorted(self._items)

    def exists(self, path: PathLike) -> bool:
        with self._lock:
            return self._resolve(path)[0] != "missing"

    def mkdir(self, path: PathLike) -> None:
        with self._lock:
            kind, name, _ = self._resolve(path)
            if kind != "missing":
                raise _err(errno.EEXIST, path)
            parent = self._resolve(posixpath.dirname(posixpath.normpath(os.fspath(path))))[0]
            if parent == "item":
                raise _err(errno.EPERM, path)  # a report item is not a group
            if parent == "attr":
                raise _err(errno.ENOTDIR, path)
            if parent != "root" or name is None:
                raise _err(errno.ENOENT, path)
            self._items[name] = _Item()

    def rmdir(self, path: PathLike) -> None:
        with self._lock:
            kind, name, _ = self._resolve(path)
            if kind == "missing":
                raise _err(errno.ENOENT, path)
            if kind == "attr":
                raise _err(errno.ENOTDIR, path)
            if kind != "item" or name is None:
                raise _err(errno.EPERM, path)  # the default group cannot go
            del self._items[name]

    def read(self, path: PathLike) -> bytes:
        with self._lock:
            item, attr = self._attribute(path)
            if not _ATTRS[attr].readable:
                raise _err(errno.EACCES, path)
            if attr == "provider":
                return PROVIDER
            if attr == "generation":
                return f"{item.write_generation}\n".encode()
            if attr == "privlevel_floor":
                return f"{self.privlevel_floor}\n".encode()
            return self._read_blob(item, attr)

    def write(self, path: PathLike, data: bytes) -> None:
        with self._lock:
            item, attr = self._attribute(path)
            if _ATTRS[attr].readable:
                raise _err(errno.EACCES, path)
            data = bytes(data)
            if attr == "inblob":
                if len(data) > INBLOB_MAX:
                    raise _err(errno.EFBIG, path)
                if not data:
                    return  # nothing written: configfs does not call the store (unverified)
                self._store(item, path, lambda: setattr(item, "inblob", data))
            elif attr == "privlevel":
                value = _kstrtouint(data, path)
                if not self.privlevel_floor <= value <= PRIVLEVEL_MAX:
                    raise _err(errno.EINVAL, path)
                self._store(item, path, lambda: setattr(item, "privlevel", value))
            elif attr == "service_provider":
                text = data[:-1] if data.endswith(b"\n") else data
                self._store(item, path, lambda: setattr(
                    item, "service_provider", text.decode("utf-8", "replace")))
            elif attr == "service_guid":
                try:
                    guid = uuid.UUID(data[:36].decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    raise _err(errno.EINVAL, path) from None
                self._store(item, path, lambda: setattr(item, "service_guid", guid))
            else:
                version = _kstrtouint(data, path)
                self._store(item, path, lambda: setattr(item, "service_manifest_version",
                                                        version))

    # -- report generation ---------------------------------------------------------------

    def _store(self, item: _Item, path: PathLike, apply: Callable[[], None]) -> None:
        """try_advance_write_generation, then the store: EBUSY when the write
        generation would catch up with the read one without an interim read."""
        if item.write_generation == (item.read_generation - 1) & _U64:
            raise _err(errno.EBUSY, path)
        item.write_generation = (item.write_generation + 1) & _U64
        apply()

    def _read_blob(self, item: _Item, attr: str) -> bytes:
        if not item.inblob:
            raise _err(errno.EINVAL)
        if item.outblob is None or item.read_generation != item.write_generation:
            item.outblob = item.auxblob = item.manifestblob = None
            self._report_new(item)
            item.read_generation = item.write_generation
        blob = {"outblob": item.outblob, "auxblob": item.auxblob,
                "manifestblob": item.manifestblob}[attr]
        return blob or b""

    def _report_new(self, item: _Item) -> None:
        """sev_report_new: one extended request with a 16 KiB certificate buffer."""
        if len(item.inblob) != INBLOB_MAX:
            raise _err(errno.EINVAL)
        if item.service_provider is not None:
            if item.service_provider != "svsm":
                raise _err(errno.EINVAL)
            raise _err(errno.EOPNOTSUPP)  # SVSM attestation is not emulated
        response, certs = self.guest.tsm_report(item.inblob, item.privlevel)
        status, size = struct.unpack_from("<II", response)
        if status in (FirmwareStatus.INVALID_PARAM, FirmwareStatus.INVALID_KEY):
            raise _err(errno.EINVAL)
        if status:
            raise _err(errno.ENXIO)
        if size + 32 > REPORT_BUFFER:
            raise _err(errno.ENOMEM)
        item.outblob = response[32:32 + size]
        item.auxblob = _trim_cert_table(certs) or None

    # -- paths -----------------------------------------------------------------------------

    def _resolve(self, path: PathLike) -> Tuple[str, Optional[str], Optional[str]]:
        """("root" | "item" | "attr" | "missing", item name, attribute name)."""
        norm = posixpath.normpath(os.fspath(path))
        if norm == self.root or self.root.startswith(norm.rstrip("/") + "/"):
            return "root", None, None
        if not norm.startswith(self.root + "/"):
            return "missing", None, None
        parts = norm[len(self.root) + 1:].split("/")
        name = parts[0]
        if len(parts) == 1:
            return ("item" if name in self._items else "missing"), name, None
        if len(parts) == 2 and name in self._items:
            spec = _ATTRS.get(parts[1])
            if spec is not None and (self._svsm or not spec.svsm_only):
                return "attr", name, parts[1]
        return "missing", name, None

    def _item(self, path: PathLike) -> _Item:
        kind, name, _ = self._resolve(path)
        if kind != "item" or name is None:
            raise _err(errno.ENOENT, path)
        return self._items[name]

    def _attribute(self, path: PathLike) -> Tuple[_Item, str]:
        kind, name, attr = self._resolve(path)
        if kind in ("root", "item"):
            raise _err(errno.EISDIR, path)
        if kind != "attr" or name is None or attr is None:
            raise _err(errno.ENOENT, path)
        return self._items[name], attr


def _trim_cert_table(buf: bytes) -> bytes:
    """The auxblob: the table up to the end of its furthest entry (sev_report_new)."""
    size = 0
    for i in range(SEV_FW_BLOB_MAX_SIZE // ENTRY.size):
        guid, offset, length = ENTRY.unpack_from(buf, i * ENTRY.size)
        if not any(guid) and not offset and not length:
            break
        size = max(size, offset + length)
    return buf[:min(size, SEV_FW_BLOB_MAX_SIZE)]


def _kstrtouint(data: bytes, path: PathLike) -> int:
    """kstrtouint(buf, 0): decimal, 0x hex or 0 octal, one trailing newline."""
    text = data.decode("ascii", "replace")
    if not _KSTRTOUINT.match(text):
        raise _err(errno.EINVAL, path)
    digits = text.strip().lstrip("+")
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 8) if (
        digits.startswith("0")) else int(digits)
    if value > 0xFFFFFFFF:
        raise _err(errno.ERANGE, path)
    return value


def _err(code: int, path: Optional[PathLike] = None) -> OSError:
    if path is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), os.fspath(path))
