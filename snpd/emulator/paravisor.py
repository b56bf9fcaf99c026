"""The Azure paravisor (HCL at VMPL 0) in front of a TPM: what makes a swtpm look like
an Azure confidential VM's vTPM.

:func:`provision` makes the TPM one: the attestation key persisted at 0x81000003, NV
0x01400002 (64 bytes of user data the guest writes with empty authorization) and NV
0x01400001 holding the HCL report (:mod:`snpd.emulator.hcl`) whose runtime JSON names
that AK. :class:`Paravisor` then serves raw TPM commands on a unix stream socket,
forwarding each to the TPM, and, like Azure's paravisor, refreshes the HCL report (a
new SNP report over the new runtime JSON) when a guest's TPM2_NV_Write to 0x01400002
succeeds, before the guest gets the answer: a guest that writes and then reads sees
the new report.

Faults, for the tests' fault matrix: :meth:`Paravisor.fail_busy` answers the next N
commands TPM_RC_RETRY; :meth:`Paravisor.remove_hcl_index` undefines 0x01400001;
:meth:`Paravisor.serve_malformed` writes a broken HCL report (garbage, or a
variable_data_size past the end or short of the runtime JSON's), and keeps doing so
on refreshes;
:meth:`Paravisor.clear_faults` undoes them all.

The TPM is any channel with ``transact(command) -> response`` (swtpm through
:class:`snpd.emulator.swtpm.SocketChannel`); commands are serialized on it, clients may
connect concurrently, and a client that sends something other than TPM frames is
disconnected without disturbing the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Set

from snpd.abi import hcl
from snpd.abi import tpm2_commands as tc
from snpd.emulator import hcl as emuhcl
from snpd.emulator.firmware import Firmware
from snpd.emulator.swtpm import FrameError, read_frame, remove_stale_socket
from snpd.errors import SnpdError, TpmError

log = logging.getLogger(__name__)

# libtpms (swtpm 0.7, libtpms 0.9) caps an NV index at 2048 bytes (TPM_PT_NV_INDEX_MAX);
# Azure's HCL index is 2600. 2048 holds the fixed 1236 bytes and our runtime JSON (about
# 620 bytes: one RSA-2048 JWK, the configuration and 128 hex digits of user data).
HCL_NV_SIZE = 2048
USER_DATA_SIZE = emuhcl.USER_DATA_SIZE
MAX_COMMAND = 4096  # swtpm's TPM_PT_MAX_COMMAND_SIZE; a larger frame is garbage

# The HCL report: the paravisor (here: the owner) writes it, the guest reads it with the
# index's empty auth. On Azure it is platform-created (PPWRITE), so the guest cannot write
# it at all; a swtpm guest holds the platform's (empty) auth too, so owner-write is as
# close as it gets. No AUTHWRITE, unlike the user data index.
HCL_ATTRIBUTES = (tc.TPMA_NV_OWNERWRITE | tc.TPMA_NV_OWNERREAD | tc.TPMA_NV_AUTHREAD
                  | tc.TPMA_NV_PPREAD | tc.TPMA_NV_NO_DA)
# The user data: the guest writes and reads it with the index's empty auth.
USER_DATA_ATTRIBUTES = tc.NV_ATTRIBUTES_RW
AK_HIERARCHY = tc.TPM_RH_ENDORSEMENT  # a primary: the same key again from the same EPS

MALFORMED = ("garbage", "variable_data_size", "variable_data_size_short")


class Transact(Protocol):
    """A TPM channel: one marshalled command in, its response out."""

    def transact(self, command: bytes) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` set up: the AK's public numbers (also in the runtime JSON),
    the VM configuration and the HCL index's size."""

    ak_n: int
    ak_e: int
    vm_configuration: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    hcl_size: int = HCL_NV_SIZE


TPM_RC_FAILURE = 0x101


def _rc(response: bytes) -> int:
    return int.from_bytes(response[6:10], "big") if len(response) >= 10 else TPM_RC_FAILURE


def rc_response(rc: int) -> bytes:
    """A bare TPM response with response code ``rc`` (what a TPM sends for an error)."""
    return struct.pack(">HII", tc.TPM_ST_NO_SESSIONS, tc.HEADER_SIZE, rc)


def _missing_ok(call: Callable[[], None]) -> None:
    try:
        call()
    except TpmError as exc:
        if not exc.handle_missing:
            raise


def nv_write_all(tpm: Transact, index: int, data: bytes, *,
                 auth_handle: Optional[int] = None) -> None:
    """Write ``data`` at offset 0 of ``index`` in NV-buffer-sized pieces."""
    for offset in range(0, len(data), tc.MAX_NV_BUFFER):
        chunk = data[offset:offset + tc.MAX_NV_BUFFER]
        tc.parse_nv_write(tpm.transact(tc.nv_write(index, chunk, offset,
                                                   auth_handle=auth_handle)))


def nv_read_all(tpm: Transact, index: int, size: int) -> bytes:
    """Read ``size`` bytes from offset 0 of ``index`` with the index's own (empty) auth."""
    parts = []
    for offset in range(0, size, tc.MAX_NV_BUFFER):
        count = min(tc.MAX_NV_BUFFER, size - offset)
        parts.append(tc.parse_nv_read(tpm.transact(tc.nv_read(index, count, offset))))
    return b"".join(parts)


def define_index(tpm: Transact, index: int, size: int, attributes: int) -> None:
    """(Re)define ``index``: an old one of that handle is undefined first."""
    _missing_ok(lambda: tc.parse_nv_undefine_space(tpm.transact(tc.nv_undefine_space(index))))
    tc.parse_nv_define_space(tpm.transact(tc.nv_define_space(index, size, attributes)))


def provision(tpm: Transact, firmware: Firmware, *,
              vm_configuration: Mapping[str, Any] = emuhcl.DEFAULT_VM_CONFIGURATION,
              hcl_size: int = HCL_NV_SIZE) -> Provisioned:
    """Make ``tpm`` an Azure vTPM: TPM2_Startup (a started TPM is fine); the AK, a
    primary RSA-2048 restricted signing key under the endorsement hierarchy, persisted
    at 0x81000003 in place of any old one; NV 0x01400002 (64 zero bytes) and NV
    0x01400001 holding an HCL report over them."""
    tc.parse_startup(tpm.transact(tc.startup()))
    ak = tc.AZURE_AK_HANDLE
    _missing_ok(lambda: tc.parse_evict_control(tpm.transact(tc.evict_control(ak, ak))))
    handle, public = tc.parse_create_primary(
        tpm.transact(tc.create_primary(AK_HIERARCHY, tc.ak_template())))
    try:
        tc.parse_evict_control(tpm.transact(tc.evict_control(handle, ak)))
    finally:
        tc.parse_flush_context(tpm.transact(tc.flush_context(handle)))
    done = Provisioned(public.rsa_n, public.rsa_e, dict(vm_configuration), hcl_size)
    define_index(tpm, tc.AZURE_USER_DATA_INDEX, USER_DATA_SIZE, USER_DATA_ATTRIBUTES)
    nv_write_all(tpm, tc.AZURE_USER_DATA_INDEX, bytes(USER_DATA_SIZE))
    define_index(tpm, tc.AZURE_HCL_REPORT_INDEX, hcl_size, HCL_ATTRIBUTES)
    nv_write_all(tpm, tc.AZURE_HCL_REPORT_INDEX, hcl_report(firmware, done, bytes(USER_DATA_SIZE)),
                 auth_handle=tc.TPM_RH_OWNER)
    return done


def hcl_report(firmware: Firmware, provisioned: Provisioned, user_data: bytes) -> bytes:
    """The HCL report for ``user_data``: a new SNP report over the new runtime JSON."""
    runtime = emuhcl.runtime_json(provisioned.ak_n, provisioned.ak_e, user_data=user_data,
                                  vm_configuration=provisioned.vm_configuration)
    return emuhcl.build_hcl_report(firmware, runtime, size=provisioned.hcl_size)


def malformed_hcl_report(kind: str, good: bytes) -> bytes:
    """``good`` broken the way ``kind`` says: "garbage" (no HCLA header, no JSON),
    "variable_data_size" (the runtime data's size runs past the index's end), or
    "variable_data_size_short" (a size that cuts the runtime JSON in half)."""
    if kind == "garbage":
        pattern = b"not an HCL report \xff\x00"
        return (pattern * (len(good) // len(pattern) + 1))[:len(good)]
    if kind in ("variable_data_size", "variable_data_size_short"):
        offset = hcl.REQUEST_DATA_OFFSET + 16
        size = len(good)
        if kind == "variable_data_size_short":
            size = struct.unpack_from("<I", good, offset)[0] // 2
        broken = bytearray(good)
        struct.pack_into("<I", broken, offset, size)
        return bytes(broken)
    raise ValueError(f"malformed HCL kind {kind!r} is not one of {', '.join(MALFORMED)}")


class Paravisor:
    """The paravisor's vTPM proxy on the unix stream socket ``socket_path`` (created
    0600), in front of ``upstream``. Serves from a thread between :meth:`start` and
    :meth:`stop` (or in a ``with``). ``counts`` tallies commands, refreshes, faults and
    dropped clients."""

    def __init__(self, upstream: Transact, firmware: Firmware, provisioned: Provisioned,
                 socket_path: Path, *, max_command: int = MAX_COMMAND) -> None:
        self.upstream = upstream
        self.firmware = firmware
        self.provisioned = provisioned
        self.socket_path = Path(socket_path)
        self.max_command = max_command
        self.counts: Dict[str, int] = {}
        self._lock = threading.Lock()  # the upstream, the faults and the counts
        self._busy = 0
        self._malformed: Optional[str] = None
        self._listener: Optional[socket.socket] = None
        self._clients: Set[socket.socket] = set()
        self._threads: List[threading.Thread] = []
        self._stopping = threading.Event()

    # -- faults -----------------------------------------------------------------

    def fail_busy(self, count: int) -> None:
        """Answer the next ``count`` commands TPM_RC_RETRY without forwarding them."""
        with self._lock:
            self._busy = max(0, count)

    def remove_hcl_index(self) -> None:
        """Undefine NV 0x01400001 (refreshes then leave it missing)."""
        with self._lock:
            _missing_ok(lambda: tc.parse_nv_undefine_space(
                self.upstream.transact(tc.nv_undefine_space(tc.AZURE_HCL_REPORT_INDEX))))

    def serve_malformed(self, kind: Optional[str]) -> None:
        """Write a malformed HCL report now and on every refresh (one of
        :data:`MALFORMED`, see :func:`malformed_hcl_report`); None restores a good
        one. The index is defined again if it was removed."""
        if kind is not None and kind not in MALFORMED:
            raise ValueError(f"malformed HCL kind {kind!r} is not one of {', '.join(MALFORMED)}")
        with self._lock:
            self._malformed = kind
            define_index(self.upstream, tc.AZURE_HCL_REPORT_INDEX, self.provisioned.hcl_size,
                         HCL_ATTRIBUTES)
            self._refresh_locked(force=True)

    def clear_faults(self) -> None:
        """Undo every fault: no more busy answers, and a good HCL report at a (re)defined
        0x01400001 over the current user data."""
        with self._lock:
            self._busy = 0
            self._malformed = None
            define_index(self.upstream, tc.AZURE_HCL_REPORT_INDEX, self.provisioned.hcl_size,
                         HCL_ATTRIBUTES)
            self._refresh_locked(force=True)

    def refresh(self) -> bytes:
        """Rebuild the HCL report from NV 0x01400002 now; the blob written."""
        with self._lock:
            return self._refresh_locked(force=True)

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _refresh_locked(self, *, force: bool = False) -> bytes:
        user_data = nv_read_all(self.upstream, tc.AZURE_USER_DATA_INDEX, USER_DATA_SIZE)
        blob = hcl_report(self.firmware, self.provisioned, user_data)
        if self._malformed is not None:
            blob = malformed_hcl_report(self._malformed, blob)
        try:
            nv_write_all(self.upstream, tc.AZURE_HCL_REPORT_INDEX, blob,
                         auth_handle=tc.TPM_RH_OWNER)
        except TpmError as exc:
            if force or not exc.handle_missing:
                raise
            return b""  # removed as a fault: it stays missing
        self._count("refresh")
        return blob

    # -- one command ---------------------------------------------------------------

    def handle(self, command: bytes) -> bytes:
        """Forward one command; after a successful NV_Write to 0x01400002, refresh the
        HCL report before answering."""
        with self._lock:
            self._count("command")
            if self._busy:
                self._busy -= 1
                self._count("busy")
                return rc_response(tc.TPM_RC_RETRY)
            try:
                response = self.upstream.transact(command)
            except (OSError, SnpdError) as exc:
                log.warning("paravisor: the TPM did not answer: %s", exc)
                return rc_response(TPM_RC_FAILURE)
            if _rc(response) != tc.TPM_RC_SUCCESS:
                return response
            try:
                target = tc.nv_write_target(command)
            except SnpdError:
                target = None
            if target is not None and target[0] == tc.AZURE_USER_DATA_INDEX:
                try:
                    self._refresh_locked()
                except (OSError, SnpdError, ValueError) as exc:
                    log.warning("paravisor: HCL report refresh failed: %s", exc)
                    return rc_response(TPM_RC_FAILURE)
            return response

    # -- the socket ------------------------------------------------------------------

    def start(self) -> Paravisor:
        if self._listener is not None:
            raise RuntimeError("the paravisor is already serving")
        remove_stale_socket(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fspath(self.socket_path))
            # connect() needs write permission: under any umask that leaves group and
            # others without it nobody else could connect before this; no process-wide
            # umask change, which would race other threads creating files
            os.chmod(self.socket_path, 0o600)
            listener.listen(16)
        except BaseException:
            listener.close()
            raise
        self._stopping.clear()
        self._listener = listener
        thread = threading.Thread(target=self._accept, name="snpd-paravisor", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # stop() shut the listener down
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._clients.add(conn)
                thread = threading.Thread(target=self._serve, args=(conn,),
                                          name="snpd-paravisor-client", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    command = read_frame(conn, limit=self.max_command)
                except FrameError as exc:
                    log.info("paravisor: dropping a client: %s", exc)
                    with self._lock:
                        self._count("dropped")
                    return
                if command is None:
                    return
                conn.sendall(self.handle(command))
        except OSError:
            return  # the client left, or stop() shut the connection down
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, disconnect every client and join the threads (bounded)."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        with self._lock:
            clients = list(self._clients)
            threads = list(self._threads)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        listener.close()
        self._threads = []
        remove_stale_socket(self.socket_path)

    def __enter__(self) -> Paravisor:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
