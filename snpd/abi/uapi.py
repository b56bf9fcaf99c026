"""The ``/dev/sev-guest`` uapi: ioctl numbers, ctypes structs and message bodies
(docs/reference/abi.md §1-2, checked against the kernel's own ``<linux/sev-guest.h>`` by a
compiled C test).

The ctypes structures are what the ioctl backend hands to the kernel and what
the emulator's ioctl function reads and writes, so both sides marshal the same
bytes through real pointers. Everything else here is pure.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import struct
from typing import Dict, Tuple

from snpd.abi.report import REPORT_DATA_SIZE, REPORT_SIZE
from snpd.errors import InvalidArgument

# -- ioctl numbers ------------------------------------------------------------------

_IOC_WRITE = 1
_IOC_READ = 2
SNP_GUEST_REQ_IOC_TYPE = ord("S")


def _iowr(nr: int, size: int) -> int:
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (SNP_GUEST_REQ_IOC_TYPE << 8) | nr


class SnpGuestRequestIoctl(ctypes.Structure):
    """``struct snp_guest_request_ioctl`` (32 bytes)."""

    _fields_ = [
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    ]

    @property
    def fw_error(self) -> int:
        return int(self.exitinfo2) & 0xFFFFFFFF

    @property
    def vmm_error(self) -> int:
        return int(self.exitinfo2) >> 32


class SnpReportReq(ctypes.Structure):
    """``struct snp_report_req`` (96 bytes)."""

    _fields_ = [
        ("user_data", ctypes.c_uint8 * REPORT_DATA_SIZE),
        ("vmpl", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint8 * 28),
    ]


class SnpReportResp(ctypes.Structure):
    """``struct snp_report_resp`` (4000 bytes): MSG_REPORT_RSP."""

    _fields_ = [("data", ctypes.c_uint8 * 4000)]


class SnpDerivedKeyReq(ctypes.Structure):
    """``struct snp_derived_key_req`` (32 bytes)."""

    _fields_ = [
        ("root_key_select", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint32),
        ("guest_field_select", ctypes.c_uint64),
        ("vmpl", ctypes.c_uint32),
        ("guest_svn", ctypes.c_uint32),
        ("tcb_version", ctypes.c_uint64),
    ]


class SnpDerivedKeyResp(ctypes.Structure):
    """``struct snp_derived_key_resp`` (64 bytes): MSG_KEY_RSP."""

    _fields_ = [("data", ctypes.c_uint8 * 64)]


class SnpExtReportReq(ctypes.Structure):
    """``struct snp_ext_report_req`` (112 bytes, 4 bytes of tail padding)."""

    _fields_ = [
        ("data", SnpReportReq),
        ("certs_address", ctypes.c_uint64),
        ("certs_len", ctypes.c_uint32),
    ]


SNP_GET_REPORT = _iowr(0x0, ctypes.sizeof(SnpGuestRequestIoctl))
SNP_GET_DERIVED_KEY = _iowr(0x1, ctypes.sizeof(SnpGuestRequestIoctl))
SNP_GET_EXT_REPORT = _iowr(0x2, ctypes.sizeof(SnpGuestRequestIoctl))

IOCTL_NAMES: Dict[int, str] = {
    SNP_GET_REPORT: "SNP_GET_REPORT",
    SNP_GET_DERIVED_KEY: "SNP_GET_DERIVED_KEY",
    SNP_GET_EXT_REPORT: "SNP_GET_EXT_REPORT",
}

# Sizes the kernel copies in each direction.
STRUCT_SIZES: Dict[str, int] = {
    "snp_guest_request_ioctl": ctypes.sizeof(SnpGuestRequestIoctl),
    "snp_report_req": ctypes.sizeof(SnpReportReq),
    "snp_report_resp": ctypes.sizeof(SnpReportResp),
    "snp_derived_key_req": ctypes.sizeof(SnpDerivedKeyReq),
    "snp_derived_key_resp": ctypes.sizeof(SnpDerivedKeyResp),
    "snp_ext_report_req": ctypes.sizeof(SnpExtReportReq),
}

# Field offsets, for the ground-truth comparison with the C header.
FIELD_OFFSETS: Dict[str, int] = {
    "snp_guest_request_ioctl.msg_version": SnpGuestRequestIoctl.msg_version.offset,
    "snp_guest_request_ioctl.req_data": SnpGuestRequestIoctl.req_data.offset,
    "snp_guest_request_ioctl.resp_data": SnpGuestRequestIoctl.resp_data.offset,
    "snp_guest_request_ioctl.exitinfo2": SnpGuestRequestIoctl.exitinfo2.offset,
    "snp_report_req.user_data": SnpReportReq.user_data.offset,
    "snp_report_req.vmpl": SnpReportReq.vmpl.offset,
    "snp_report_req.rsvd": SnpReportReq.rsvd.offset,
    "snp_derived_key_req.root_key_select": SnpDerivedKeyReq.root_key_select.offset,
    "snp_derived_key_req.guest_field_select": SnpDerivedKeyReq.guest_field_select.offset,
    "snp_derived_key_req.vmpl": SnpDerivedKeyReq.vmpl.offset,
    "snp_derived_key_req.guest_svn": SnpDerivedKeyReq.guest_svn.offset,
    "snp_derived_key_req.tcb_version": SnpDerivedKeyReq.tcb_version.offset,
    "snp_ext_report_req.data": SnpExtReportReq.data.offset,
    "snp_ext_report_req.certs_address": SnpExtReportReq.certs_address.offset,
    "snp_ext_report_req.certs_len": SnpExtReportReq.certs_len.offset,
}

# -- exitinfo2, firmware and host errors ----------------------------------------------

SNP_GUEST_VMM_ERR_SHIFT = 32
SNP_GUEST_VMM_ERR_INVALID_LEN = 1
SNP_GUEST_VMM_ERR_BUSY = 2
SEV_RET_NO_FW_CALL = 0xFFFFFFFF
PAGE_SIZE = 4096
SEV_FW_BLOB_MAX_SIZE = 16 * 1024
MSG_VERSION = 1


def vmm_err(code: int) -> int:
    return code << SNP_GUEST_VMM_ERR_SHIFT


class FirmwareStatus(enum.IntEnum):
    """SEV firmware status codes that matter to a guest (psp-sev.h); others stay numeric."""

    SUCCESS = 0x00
    INVALID_LEN = 0x04
    POLICY_FAILURE = 0x07
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    INVALID_KEY = 0x27

    @classmethod
    def describe(cls, code: int) -> str:
        try:
            return f"{cls(code).name} (0x{code:x})"
        except ValueError:
            return f"0x{code:x}"


# -- message bodies ----------------------------------------------------------------------

REPORT_RESP_HEADER = struct.Struct("<II24x")
KEY_RESP = struct.Struct("<I28x32s")
DERIVED_KEY_SIZE = 32


def parse_report_response(data: bytes) -> Tuple[int, bytes]:
    """(STATUS, report) from MSG_REPORT_RSP; the report is empty when STATUS is non-zero."""
    status, size = REPORT_RESP_HEADER.unpack_from(data)
    if status != 0:
        return status, b""
    if size != REPORT_SIZE:
        raise InvalidArgument(f"firmware answered a report of {size} bytes, not {REPORT_SIZE}")
    return status, bytes(data[0x20:0x20 + REPORT_SIZE])


def build_report_response(status: int, report: bytes = b"") -> bytes:
    body = REPORT_RESP_HEADER.pack(status, len(report) if status == 0 else 0) + report
    return body + bytes(4000 - len(body))


def parse_key_response(data: bytes) -> Tuple[int, bytes]:
    status, key = KEY_RESP.unpack_from(data)
    return status, (key if status == 0 else b"")


def build_key_response(status: int, key: bytes = bytes(DERIVED_KEY_SIZE)) -> bytes:
    return KEY_RESP.pack(status, key) + bytes(64 - KEY_RESP.size)


# -- derived-key requests -------------------------------------------------------------------

GUEST_FIELDS: Dict[str, int] = {
    "policy": 0,
    "image_id": 1,
    "family_id": 2,
    "measurement": 3,
    "guest_svn": 4,
    "tcb_version": 5,
}
GUEST_FIELD_MASK = (1 << 6) - 1


class RootKey(str, enum.Enum):
    VCEK = "vcek"
    VMRK = "vmrk"


@dataclasses.dataclass(frozen=True)
class DerivedKeyRequest:
    """MSG_KEY_REQ: which root key, which guest fields to mix in, and the bounds the
    firmware checks (vmpl ≥ the VMPCK's, guest_svn ≤ the ID block's, tcb ≤ COMMITTED)."""

    root_key: RootKey = RootKey.VCEK
    guest_field_select: int = 0
    vmpl: int = 0
    guest_svn: int = 0
    tcb_version: int = 0

    def __post_init__(self) -> None:
        for name in ("guest_field_select", "vmpl", "guest_svn", "tcb_version"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument(f"{name} must be an integer, not {type(value).__name__}")
        if not 0 <= self.guest_field_select <= GUEST_FIELD_MASK:
            raise InvalidArgument(
                f"guest_field_select 0x{self.guest_field_select:x} sets bits outside 0-5 "
                "(policy, image_id, family_id, measurement, guest_svn, tcb_version)")
        if not 0 <= self.vmpl <= 3:
            raise InvalidArgument(f"vmpl {self.vmpl} is not 0-3")
        if not 0 <= self.guest_svn < 1 << 32:
            raise InvalidArgument(f"guest_svn {self.guest_svn} is not a u32")
        if not 0 <= self.tcb_version < 1 << 64:
            raise InvalidArgument(f"tcb_version {self.tcb_version} is not a u64")

    @classmethod
    def from_fields(cls, root_key: str, fields: Tuple[str, ...] | list[str], **kw: int
                    ) -> DerivedKeyRequest:
        try:
            root = RootKey(root_key)
        except (ValueError, TypeError):
            raise InvalidArgument(f"root key {root_key!r} is neither vcek nor vmrk") from None
        select = 0
        for name in fields:
            if not isinstance(name, str) or name not in GUEST_FIELDS:
                raise InvalidArgument(f"unknown guest field {name!r}; expected "
                                      f"{', '.join(GUEST_FIELDS)}")
            select |= 1 << GUEST_FIELDS[name]
        return cls(root, select, **kw)

    @property
    def fields(self) -> Tuple[str, ...]:
        return tuple(n for n, b in GUEST_FIELDS.items() if self.guest_field_select >> b & 1)

    def to_struct(self) -> SnpDerivedKeyReq:
        return SnpDerivedKeyReq(1 if self.root_key is RootKey.VMRK else 0, 0,
                                self.guest_field_select, self.vmpl, self.guest_svn,
                                self.tcb_version)

    @classmethod
    def from_struct(cls, req: SnpDerivedKeyReq) -> DerivedKeyRequest:
        """Decode what a caller passed; reserved bits make it invalid (firmware 0x16)."""
        if req.root_key_select & ~1 or req.rsvd:
            raise InvalidArgument("reserved bits set in the key request")
        return cls(RootKey.VMRK if req.root_key_select & 1 else RootKey.VCEK,
                   int(req.guest_field_select), int(req.vmpl), int(req.guest_svn),
                   int(req.tcb_version))
