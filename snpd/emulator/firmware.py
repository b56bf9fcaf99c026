"""The PSP and the host, at the guest-message level (docs/reference/abi.md §1.3-1.5, §2, §4).

:class:`Firmware` answers decrypted guest messages the way the SEV firmware
does: MSG_REPORT_REQ with a signed report of the configured version,
MSG_KEY_REQ with a deterministic derived key, both with STATUS in the body for
bad parameters. :meth:`Firmware.guest_request` adds the untrusted host in front
of it: throttling (BUSY), the certificate buffer of extended requests
(INVALID_LEN, the certificate table) and injected faults. The kernel model in
:mod:`snpd.emulator.kernel` sits on top and turns host answers into errno.

Faults are queued on ``firmware.faults``: ``faults.push(DeviceFault.busy(), count=3)``
makes the next three host exchanges (VMGEXITs, so kernel retries count) answer
BUSY; ``count=None`` keeps a fault until :meth:`FaultQueue.clear`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import os
import struct
import threading
import time
from typing import Callable, Counter, Optional, Tuple, Union

from snpd.abi import certtable
from snpd.abi.product import Product
from snpd.abi.report import REPORT_DATA_SIZE, REPORT_SIZE
from snpd.abi.uapi import (
    DERIVED_KEY_SIZE,
    PAGE_SIZE,
    SNP_GUEST_VMM_ERR_INVALID_LEN,
    DerivedKeyRequest,
    FirmwareStatus,
    SnpDerivedKeyReq,
    SnpReportReq,
    build_key_response,
    build_report_response,
    vmm_err,
)
from snpd.emulator.faults import DeviceFault, FaultQueue
from snpd.emulator.sign import sign_report
from snpd.emulator.state import EmulatorState

# enum msg_type (docs/reference/abi.md §2.8)
MSG_KEY_REQ = 3
MSG_REPORT_REQ = 5
MSG_NAMES = {MSG_KEY_REQ: "derived_key", MSG_REPORT_REQ: "report"}
# Message versions the firmware accepts per type (KEY_REQ v2 adds LAUNCH_MIT_VECTOR).
MSG_VERSIONS = {MSG_KEY_REQ: (1, 2), MSG_REPORT_REQ: (1,)}

CPUID = {Product.MILAN: (0x19, 0x01, 0x01), Product.GENOA: (0x19, 0x11, 0x01),
         Product.TURIN: (0x1A, 0x02, 0x01)}
GUEST_FIELD_MASK = 0x3F
INVALID_PARAM = int(FirmwareStatus.INVALID_PARAM)
_KEY_LABEL = b"snpd emulator: MSG_KEY_REQ v1"


# -- the host's answer to one VMGEXIT ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostAnswer:
    """What one guest request (one VMGEXIT) comes back with.

    ``exitinfo2`` is SW_EXITINFO2; ``response`` the decrypted response message body
    (only when exitinfo2 is 0); ``certs`` what the host wrote into the certificate
    pages; ``npages`` RBX (the page count the host wants, on INVALID_LEN);
    ``tampered`` that the response will not authenticate.
    """

    exitinfo2: int = 0
    response: bytes = b""
    certs: bytes = b""
    npages: int = 0
    tampered: bool = False


KeyRequest = Union[SnpDerivedKeyReq, DerivedKeyRequest, bytes]


class Firmware:
    """The emulated PSP and host for one launched guest (one REPORT_ID).

    ``requests`` counts what was served: ``vmgexit`` per host exchange (retries
    included), ``ext`` per extended exchange, ``report`` and ``derived_key`` per
    message the PSP answered, and one key per fault kind that fired.
    """

    def __init__(
        self,
        state: EmulatorState,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.state = state
        self.config = state.config
        self.clock = clock
        self.sleep = sleep
        self.faults = FaultQueue()
        for spec in state.config.faults:  # scheduled in the configuration
            self.faults.push(spec.fault(), spec.times, after=spec.after)
        self.requests: Counter[str] = collections.Counter()
        self.report_id = random(32)
        self._lock = threading.Lock()
        self._template = self._build_template()
        self._cert_blob = self._build_cert_blob()

    # -- the PSP ---------------------------------------------------------------

    def report(self, report_data: bytes, vmpl: int, *, vmpck: Optional[int] = None
               ) -> Tuple[int, bytes]:
        """(STATUS, report): MSG_REPORT_REQ as the firmware answers it. STATUS 0x16 and
        no report when ``vmpl`` is below the requesting VMPCK's VMPL or above 3."""
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data is {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        self._count("report")
        floor = self.config.vmpck if vmpck is None else vmpck
        if not floor <= vmpl <= 3:
            return INVALID_PARAM, b""
        raw = bytearray(self._template)
        struct.pack_into("<I", raw, 0x30, vmpl)
        raw[0x50:0x90] = report_data
        return 0, sign_report(bytes(raw), self.state.signing_key)

    def derived_key(self, request: KeyRequest, *, vmpck: Optional[int] = None
                    ) -> Tuple[int, bytes]:
        """(STATUS, 32-byte key): MSG_KEY_REQ. STATUS 0x16 for reserved bits, field
        selections above bit 5, a VMPL below the VMPCK's, a guest SVN above the ID
        block's, or a TCB above COMMITTED_TCB in any byte.

        The key is HMAC-SHA256 under the selected root (VCEK-rooted: also bound to the
        chip ID and committed TCB; VMRK: the VM's own root) of the VMPL, the selection
        and exactly the selected fields. As in AMD's ABI, GUEST_SVN and TCB_VERSION
        mix in the *requested* values (bounded by the launched guest's), so a guest
        can re-derive a key sealed under an older SVN or TCB; the other fields are
        the launched guest's.
        """
        req = _key_struct(request)
        self._count("derived_key")
        cfg = self.config
        floor = cfg.vmpck if vmpck is None else vmpck
        asked = int(req.tcb_version).to_bytes(8, "little")
        committed = cfg.tcb("committed").raw.to_bytes(8, "little")
        if (req.root_key_select & ~1 or req.rsvd or req.guest_field_select & ~GUEST_FIELD_MASK
                or not floor <= req.vmpl <= 3 or req.guest_svn > cfg.key_svn_limit
                or any(a > c for a, c in zip(asked, committed))):
            return INVALID_PARAM, b""
        select = int(req.guest_field_select)
        vmrk = bool(req.root_key_select & 1)
        parts = [_KEY_LABEL, struct.pack("<IQI", int(vmrk), select, req.vmpl)]
        fields = (struct.pack("<Q", cfg.policy), cfg.image_id, cfg.family_id, cfg.measurement,
                  struct.pack("<I", req.guest_svn), asked)
        parts += [value for bit, value in enumerate(fields) if select >> bit & 1]
        if not vmrk:
            parts += [self.state.chip_id, committed]
        root = self.state.vmrk_root if vmrk else self.state.vcek_root
        msg = b"".join(len(p).to_bytes(2, "big") + p for p in parts)
        return 0, hmac.new(root, msg, hashlib.sha256).digest()[:DERIVED_KEY_SIZE]

    # -- the host --------------------------------------------------------------

    def cert_blob(self) -> bytes:
        """What the host writes into a large enough certificate buffer: for "table",
        the GHCB table with ARK, ASK (or ASVK under the ASK GUID), VCEK or VLEK and
        the CRL, padded to whole pages; for "empty" (upstream KVM), the 24-byte
        terminator alone."""
        return self._cert_blob

    @property
    def required_pages(self) -> int:
        """Pages an extended request must offer before the host hands out its table."""
        if self.config.host_certs == "empty":
            return 0
        return len(self._cert_blob) // PAGE_SIZE

    def guest_request(
        self,
        msg_type: int,
        msg_version: int,
        body: bytes,
        *,
        vmpck: Optional[int] = None,
        ext_pages: Optional[int] = None,
    ) -> HostAnswer:
        """One VMGEXIT: a plain guest request (``ext_pages`` None) or an extended one
        offering ``ext_pages`` pages for certificates."""
        self._count("vmgexit")
        if ext_pages is not None:
            self._count("ext")
        delay = self.config.latency + self.faults.delay()
        if delay:
            self.sleep(delay)

        def applies(fault: DeviceFault) -> bool:
            if fault.kind == "wipe":
                return False
            if fault.kind == "invalid_len":
                return ext_pages is not None and ext_pages < fault.pages
            return True

        fault = self.faults.take(applies)
        if fault is not None:
            self._count(fault.kind)
            if fault.kind == "invalid_len":
                return HostAnswer(exitinfo2=fault.exitinfo2, npages=fault.pages)
            if fault.exitinfo2:
                return HostAnswer(exitinfo2=fault.exitinfo2)
        certs = b""
        if ext_pages is not None:
            if ext_pages < self.required_pages:
                return HostAnswer(exitinfo2=vmm_err(SNP_GUEST_VMM_ERR_INVALID_LEN),
                                  npages=self.required_pages)
            if ext_pages:
                certs = self._cert_blob
        response: Optional[bytes]
        if fault is not None and fault.kind == "body_status":
            response = self._status_only(msg_type, fault.status)
        else:
            response = self._psp(msg_type, msg_version, body, vmpck)
        if response is None:  # the firmware refused the message itself
            return HostAnswer(exitinfo2=INVALID_PARAM)
        return HostAnswer(response=response, certs=certs,
                          tampered=fault is not None and fault.kind == "tamper")

    def _psp(self, msg_type: int, msg_version: int, body: bytes, vmpck: Optional[int]
             ) -> Optional[bytes]:
        """The decrypted response body, or None for a message the firmware rejects
        outright (unknown type or version; the status it gives then is unverified)."""
        if msg_version not in MSG_VERSIONS.get(msg_type, ()):
            return None
        if msg_type == MSG_REPORT_REQ:
            req = SnpReportReq.from_buffer_copy(body)
            status, report = self.report(bytes(req.user_data), int(req.vmpl), vmpck=vmpck)
            return build_report_response(status, report)
        status, key = self.derived_key(body, vmpck=vmpck)
        return build_key_response(status, key) if status == 0 else build_key_response(status)

    @staticmethod
    def _status_only(msg_type: int, status: int) -> bytes:
        if msg_type == MSG_REPORT_REQ:
            return build_report_response(status)
        return build_key_response(status)

    def _count(self, what: str) -> None:
        with self._lock:
            self.requests[what] += 1

    # -- construction ------------------------------------------------------------

    def _build_template(self) -> bytes:
        """Every byte of the report except VMPL, REPORT_DATA and the signature."""
        cfg, state = self.config, self.state
        raw = bytearray(REPORT_SIZE)
        vlek = cfg.signer == "vlek"
        key_info = (1 if vlek else 0) << 2 | (1 if any(cfg.author_key_digest) else 0)
        struct.pack_into("<IIQ16s16s", raw, 0, cfg.report_version, cfg.guest_svn, cfg.policy,
                         cfg.family_id, cfg.image_id)
        struct.pack_into("<IQQI", raw, 0x34, 1, cfg.tcb("current").raw, cfg.platform_info,
                         key_info)
        struct.pack_into("<48s32s48s48s32s32sQ", raw, 0x90, cfg.measurement, cfg.host_data,
                         cfg.id_key_digest, cfg.author_key_digest, self.report_id,
                         b"\xff" * 32, cfg.tcb("reported").raw)
        if cfg.report_version >= 3:
            raw[0x188:0x18B] = bytes(CPUID[cfg.product])
        if not (vlek or cfg.mask_chip_id):
            raw[0x1A0:0x1E0] = state.chip_id
        cur, com = cfg.current_firmware, cfg.committed_firmware
        struct.pack_into("<QBBBxBBBxQ", raw, 0x1E0, cfg.tcb("committed").raw, cur.build,
                         cur.minor, cur.major, com.build, com.minor, com.major,
                         cfg.tcb("launch").raw)
        if cfg.report_version >= 5:
            struct.pack_into("<QQ", raw, 0x1F8, cfg.launch_mit_vector, cfg.current_mit_vector)
        return bytes(raw)

    def _build_cert_blob(self) -> bytes:
        if self.config.host_certs == "empty":
            return bytes(certtable.ENTRY_SIZE)
        state = self.state
        if self.config.signer == "vcek":
            inter, leaf = (certtable.ASK_GUID, state.ask), (certtable.VCEK_GUID, state.vcek)
        else:
            inter, leaf = (certtable.ASK_GUID, state.asvk), (certtable.VLEK_GUID, state.vlek)
        entries = [(certtable.ARK_GUID, state.ark.der), (inter[0], inter[1].der),
                   (leaf[0], leaf[1].der), (certtable.CRL_GUID, state.crl.der)]
        return certtable.build_cert_table(entries, pad_to=PAGE_SIZE)


def _key_struct(request: KeyRequest) -> SnpDerivedKeyReq:
    if isinstance(request, SnpDerivedKeyReq):
        return request
    if isinstance(request, DerivedKeyRequest):
        return request.to_struct()
    return SnpDerivedKeyReq.from_buffer_copy(bytes(request)[:32])
