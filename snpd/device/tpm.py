"""A TPM 2.0 as a blocking client: the channel (a character device or a socket) and
the few high-level operations the Azure vTPM backend needs.

The bytes are :mod:`snpd.abi.tpm2_commands`'s; this module only moves them and adds
the policy that needs a clock: a TPM that answers TPM_RC_RETRY (or YIELDED, TESTING,
NV_RATE) gets the same command again a bounded number of times, then the caller gets
:class:`Busy`. A :class:`Tpm` belongs to one thread, like the device in the broker.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, TypeVar

from snpd.abi import tpm2_commands as tc
from snpd.abi.tpm import DIGEST_SIZES, HASH_NAMES
from snpd.errors import (
    Busy,
    DeviceError,
    DeviceUnavailable,
    EvidenceFormatError,
    Timeout,
    TpmError,
)

T = TypeVar("T")

DEFAULT_SPEC = "/dev/tpmrm0"
UNIX_PREFIX = "unix:"
RETRY_TRIES = 8
RETRY_DELAY = 0.01  # seconds before the second try; it doubles, up to RETRY_DELAY_MAX
RETRY_DELAY_MAX = 0.5
PCR_READ_ROUNDS = 4  # whole PCR reads started over when the update counter moved

_MISSING_INDEX = {
    tc.AZURE_HCL_REPORT_INDEX: "no Azure HCL report in this TPM",
    tc.AZURE_USER_DATA_INDEX: "no Azure user data index in this TPM",
}
_MISSING_KEY = {tc.AZURE_AK_HANDLE: "no Azure attestation key in this TPM"}


class TpmChannel(Protocol):
    """Carries one whole command to the TPM and brings back its whole response."""

    def transact(self, command: bytes) -> bytes:
        ...

    def close(self) -> None:
        ...


class DeviceChannel:
    """The kernel's TPM character device (``/dev/tpmrm0``, the resource manager): one
    write of the command, one read of the response. The kernel bounds how long the
    TPM may take."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: Optional[int] = fd

    def _open_fd(self) -> int:
        if self._fd is None:
            raise DeviceError(f"the TPM channel to {self.path} is closed")
        return self._fd

    def transact(self, command: bytes) -> bytes:
        fd = self._open_fd()
        try:
            written = os.write(fd, command)
            if written != len(command):
                raise DeviceError(f"{self.path} took {written} of the command's "
                                  f"{len(command)} bytes")
            response = os.read(fd, tc.MAX_RESPONSE + 1)
        except OSError as exc:
            raise DeviceError(f"TPM command on {self.path} failed: {exc.strerror}",
                              errno=exc.errno) from exc
        if not response:
            raise DeviceError(f"{self.path} answered nothing")
        return response

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class SocketChannel:
    """A stream socket speaking raw TPM commands (swtpm's ``--server type=unixio``, or
    a paravisor emulator's proxy): the command, then the 10-byte response header and
    exactly the rest it announces."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self._sock: Optional[socket.socket] = sock

    def _recv_exactly(self, sock: socket.socket, size: int) -> bytes:
        chunks: List[bytes] = []
        left = size
        while left:
            chunk = sock.recv(min(left, 65536))
            if not chunk:
                raise DeviceError(f"the TPM at {UNIX_PREFIX}{self.path} closed the connection "
                                  "in the middle of a response")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def transact(self, command: bytes) -> bytes:
        sock = self._sock
        if sock is None:
            raise DeviceError(f"the TPM channel to {UNIX_PREFIX}{self.path} is closed")
        try:
            sock.sendall(command)
            header = self._recv_exactly(sock, tc.HEADER_SIZE)
            size = struct.unpack(">I", header[2:6])[0]
            if not tc.HEADER_SIZE <= size <= tc.MAX_RESPONSE:
                raise EvidenceFormatError(f"TPM response: responseSize is {size}, not "
                                          f"{tc.HEADER_SIZE}..{tc.MAX_RESPONSE}")
            return header + self._recv_exactly(sock, size - tc.HEADER_SIZE)
        except socket.timeout as exc:
            raise Timeout(f"the TPM at {UNIX_PREFIX}{self.path} did not answer in time") from exc
        except OSError as exc:
            raise DeviceError(f"TPM command on {UNIX_PREFIX}{self.path} failed: "
                              f"{exc.strerror or exc}", errno=exc.errno) from exc

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def _unavailable(spec: str, exc: OSError) -> DeviceUnavailable:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DeviceUnavailable(f"cannot open the TPM at {spec} ({reason}): snpd needs "
                                 "read-write access (the tss group owns /dev/tpmrm0)")
    if spec.startswith(UNIX_PREFIX):
        return DeviceUnavailable(f"no TPM at {spec} ({reason}); is the TPM emulator running?")
    return DeviceUnavailable(f"no TPM at {spec} ({reason}); is this an Azure confidential VM?")


def open_tpm(spec: str = DEFAULT_SPEC, *, timeout: float = 30.0) -> TpmChannel:
    """A channel to the TPM that ``spec`` names: a character device path, or
    ``unix:/path`` for a stream socket. ``timeout`` bounds each socket operation."""
    if spec.startswith(UNIX_PREFIX):
        path = spec[len(UNIX_PREFIX):]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except socket.timeout as exc:
            sock.close()
            raise Timeout(f"the TPM at {spec} did not accept a connection in time") from exc
        except OSError as exc:
            sock.close()
            raise _unavailable(spec, exc) from exc
        return SocketChannel(path, sock)
    try:
        fd = os.open(spec, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _unavailable(spec, exc) from exc
    return DeviceChannel(spec, fd)


class Tpm:
    """Blocking TPM 2.0 operations over one channel, for one thread. ``sleep`` is
    injected so that tests of the retry policy never wait."""

    def __init__(self, channel: TpmChannel, *, tries: int = RETRY_TRIES,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.channel = channel
        self.tries = max(1, tries)
        self._sleep = sleep
        self._nv_buffer: Optional[int] = None

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, command: bytes, parse: Callable[[bytes], T]) -> T:
        """Send ``command`` and parse its response, trying again on a retryable warning."""
        delay = RETRY_DELAY
        last: Optional[TpmError] = None
        for attempt in range(self.tries):
            if attempt:
                self._sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX)
            try:
                return parse(self.channel.transact(command))
            except TpmError as exc:
                if not exc.retryable:
                    raise
                last = exc
        assert last is not None
        code = tc.describe_rc(last.rc).split(":")[0]
        raise Busy(f"the TPM stayed busy ({code}) after {self.tries} tries of "
                   f"TPM2_{last.command}") from last

    def _handle_call(self, command: bytes, parse: Callable[[bytes], T], missing: str,
                     hint: Optional[str]) -> T:
        """:meth:`_call` for a command naming one handle: a handle the TPM does not have
        raises :class:`DeviceUnavailable` saying ``missing`` (and why, when known)."""
        try:
            return self._call(command, parse)
        except TpmError as exc:
            if exc.handle_missing:
                raise DeviceUnavailable(missing + (f": {hint}" if hint else "")) from exc
            raise

    # -------------------------------------------------------------- NV

    def startup(self) -> None:
        """TPM2_Startup(CLEAR); a TPM that is already started is fine."""
        self._call(tc.startup(), tc.parse_startup)

    def tpm_property(self, prop: int) -> Optional[int]:
        """A TPM_PT_* value (TPM2_GetCapability), or None when the TPM does not say."""
        return self._call(tc.get_tpm_property(prop),
                          lambda response: tc.parse_get_tpm_property(response, prop))

    def nv_buffer_max(self) -> int:
        """The most bytes one NV_Read or NV_Write moves (TPM_PT_NV_BUFFER_MAX)."""
        if self._nv_buffer is None:
            try:
                value = self.tpm_property(tc.TPM_PT_NV_BUFFER_MAX)
            except TpmError:
                value = None
            self._nv_buffer = min(value or tc.MAX_NV_BUFFER, tc.MAX_NV_BUFFER)
        return self._nv_buffer

    def nv_public(self, index: int) -> tc.NvPublic:
        """The index's public area; a missing index raises :class:`DeviceUnavailable`."""
        return self._handle_call(tc.nv_read_public(index), tc.parse_nv_read_public,
                                 f"NV index 0x{index:08x} is not defined",
                                 _MISSING_INDEX.get(index))

    def nv_read(self, index: int) -> bytes:
        """The whole index, read in chunks of the TPM's NV buffer."""
        size = self.nv_public(index).data_size
        step = self.nv_buffer_max()
        chunks: List[bytes] = []
        for offset in range(0, size, step):
            want = min(step, size - offset)
            chunk = self._call(tc.nv_read(index, want, offset), tc.parse_nv_read)
            if len(chunk) != want:
                raise EvidenceFormatError(f"TPM2_NV_Read response: {len(chunk)} bytes of "
                                          f"NV index 0x{index:08x} at offset {offset}, "
                                          f"{want} asked for")
            chunks.append(chunk)
        return b"".join(chunks)

    def nv_write(self, index: int, data: bytes, offset: int = 0) -> None:
        """Write ``data`` at ``offset``, in chunks of the TPM's NV buffer."""
        step = self.nv_buffer_max()
        for start in range(0, len(data), step):
            self._call(tc.nv_write(index, data[start:start + step], offset + start),
                       tc.parse_nv_write)

    def define_space(self, index: int, size: int,
                     attributes: int = tc.NV_ATTRIBUTES_RW) -> None:
        self._call(tc.nv_define_space(index, size, attributes), tc.parse_nv_define_space)

    def undefine_space(self, index: int) -> None:
        self._call(tc.nv_undefine_space(index), tc.parse_nv_undefine_space)

    # -------------------------------------------------------------- keys

    def create_primary(self, hierarchy: int = tc.TPM_RH_OWNER,
                       template: Optional[bytes] = None) -> Tuple[int, tc.TpmPublic]:
        """A primary key (by default the AK template) as a transient handle."""
        return self._call(tc.create_primary(hierarchy, template or tc.ak_template()),
                          tc.parse_create_primary)

    def evict_control(self, object_handle: int, persistent_handle: int) -> None:
        self._call(tc.evict_control(object_handle, persistent_handle), tc.parse_evict_control)

    def flush(self, handle: int) -> None:
        self._call(tc.flush_context(handle), tc.parse_flush_context)

    def read_public(self, handle: int) -> tc.TpmPublic:
        """The key's public area; no key at ``handle`` raises :class:`DeviceUnavailable`."""
        return self._handle_call(tc.read_public(handle), tc.parse_read_public,
                                 f"no key at handle 0x{handle:08x}", _MISSING_KEY.get(handle))

    # -------------------------------------------------------------- quote and PCRs

    def quote(self, handle: int, nonce: bytes, pcrs: Sequence[int],
              bank: int = tc.TPM_ALG_SHA256) -> Tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) over ``pcrs``, with ``nonce`` as extraData."""
        return self._call(tc.quote(handle, nonce, pcrs, bank), tc.parse_quote)

    def pcr_values(self, pcrs: Sequence[int], bank: int = tc.TPM_ALG_SHA256) -> List[bytes]:
        """The values of ``pcrs`` in ``bank``, in the order asked. The TPM answers at most
        8 per call; when its update counter moves between calls the read starts over, so
        the values are one consistent set."""
        wanted = sorted(set(pcrs))
        size = DIGEST_SIZES.get(bank)
        for _ in range(PCR_READ_ROUNDS):
            values: Dict[int, bytes] = {}
            counter: Optional[int] = None
            left = wanted
            while left:
                now, indices, digests = self._call(tc.pcr_read(left, bank), tc.parse_pcr_read)
                if counter is not None and now != counter:
                    break
                counter = now
                if not indices or not set(indices) <= set(left):
                    name = HASH_NAMES.get(bank, f"0x{bank:04x}")
                    raise DeviceError(f"the TPM answered PCRs {list(indices)} of the {name} "
                                      f"bank when asked for {left}: is the bank allocated?")
                for index, digest in zip(indices, digests):
                    if size is not None and len(digest) != size:
                        raise EvidenceFormatError(f"TPM2_PCR_Read response: PCR {index} is "
                                                  f"{len(digest)} bytes, not {size}")
                    values[index] = digest
                left = [p for p in left if p not in values]
            else:
                return [values[p] for p in pcrs]
        raise Busy(f"the TPM's PCRs kept changing during {PCR_READ_ROUNDS} reads")
