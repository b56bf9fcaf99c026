"""The emulated paravisor's HCL report: what Azure's HCL (at VMPL 0) stores in the vTPM
at NV index 0x01400001, built from the emulator's firmware.

The layout is :mod:`snpd.abi.hcl`'s, written the way the real one is (the shared
vector ``azure/evidence-v1``): header ``HCLA``, version 1, report_size = the bytes up
to the end of the runtime JSON, request_type 2, status 0; the SNP report, requested at
VMPL 0 with REPORT_DATA = SHA-256(runtime JSON) || 32 zero bytes; the IGVM request data
(data_size = 20 + JSON size, version 1, report_type 2, hash type 1, variable_data_size);
the runtime JSON; zeros up to the NV index's size.

The runtime JSON is compact, its members in Azure's order: ``keys`` (``HCLAkPub`` only:
the real one also lists ``HCLEkPub``, left out so that the report fits swtpm's
smaller NV index), ``vm-configuration``, ``user-data`` (the 64 bytes last written to NV
0x01400002, as hex: upper case, as Azure's other hex-like members such as
``vmUniqueId``; the vector's all-zero value cannot tell, and readers decode either).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any, Dict, Mapping

from snpd.abi import hcl
from snpd.emulator.firmware import Firmware
from snpd.errors import DeviceError

USER_DATA_SIZE = 64
HCL_VERSION = 1
REQUEST_TYPE = 2  # what the real header carries (the vector's value)
REQUEST_VERSION = 1

# What the real vector's vm-configuration says (vmUniqueId is per VM: the emulator's is
# fixed, an upper-case GUID like Azure's).
DEFAULT_VM_CONFIGURATION: Mapping[str, Any] = {
    "console-enabled": True,
    "secure-boot": True,
    "tpm-enabled": True,
    "vmUniqueId": "5E3A7C1D-0B9F-4C6E-8A2D-7F41E9B0C5A3",
}


def _b64url(value: int) -> str:
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def runtime_json(ak_n: int, ak_e: int, *, user_data: bytes,
                 vm_configuration: Mapping[str, Any]) -> bytes:
    """The runtime JSON the paravisor hashes into REPORT_DATA: compact, UTF-8, Azure's
    member order; ``user_data`` is the 64 bytes of NV 0x01400002."""
    if len(user_data) != USER_DATA_SIZE:
        raise ValueError(f"user-data is {USER_DATA_SIZE} bytes, got {len(user_data)}")
    doc: Dict[str, Any] = {
        "keys": [{"kid": hcl.AK_KID, "key_ops": ["sign"], "kty": "RSA",
                  "e": _b64url(ak_e), "n": _b64url(ak_n)}],
        "vm-configuration": dict(vm_configuration),
        "user-data": user_data.hex().upper(),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def build_hcl_report(firmware: Firmware, runtime: bytes, *, size: int) -> bytes:
    """The HCL report binding ``runtime``, zero-padded to ``size`` bytes (the NV index's
    size). A fresh SNP report from ``firmware`` at VMPL 0, as the paravisor gets one."""
    end = hcl.RUNTIME_DATA_OFFSET + len(runtime)
    if end > size:
        raise ValueError(f"the HCL report needs {end} bytes; the index holds {size}")
    report_data = hashlib.sha256(runtime).digest() + bytes(32)
    status, report = firmware.report(report_data, 0, vmpck=0)
    if status or len(report) != hcl.SNP_REPORT_SIZE:
        raise DeviceError("the emulated firmware refused the paravisor's report",
                          fw_error=status)
    header = hcl.HCL_SIGNATURE + struct.pack("<7I", HCL_VERSION, end, REQUEST_TYPE, 0, 0, 0, 0)
    request = struct.pack("<5I", hcl.REQUEST_DATA_SIZE + len(runtime), REQUEST_VERSION,
                          hcl.REPORT_TYPE_SNP, hcl.HASH_TYPE_SHA256, len(runtime))
    blob = header + report + request + runtime
    return blob + bytes(size - len(blob))
