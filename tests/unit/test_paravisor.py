"""The emulated Azure paravisor (issue 14 item 4): the HCL report it builds, and (over a
real swtpm) the vTPM proxy that keeps it at NV 0x01400001 and refreshes it on a write
to 0x01400002."""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from snpd.abi import hcl
from snpd.emulator import hcl as emuhcl
from snpd.emulator.firmware import Firmware
from snpd.emulator.launch import EmulatorConfig
from snpd.emulator.state import EmulatorState
from snpd.errors import EvidenceFormatError


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def state(tmp_path_factory: Any) -> EmulatorState:
    path = tmp_path_factory.mktemp("paravisor-emu")
    return EmulatorState.load_or_create(path, EmulatorConfig(), now=_now, rsa_bits=2048)


@pytest.fixture(scope="module")
def ak_numbers() -> Tuple[int, int]:
    numbers = rsa.generate_private_key(public_exponent=65537,
                                       key_size=2048).public_key().public_numbers()
    return numbers.n, numbers.e


# -- the HCL report builder (no TPM) ---------------------------------------------------

def test_runtime_json_has_azures_layout(ak_numbers: Tuple[int, int]) -> None:
    n, e = ak_numbers
    data = emuhcl.runtime_json(n, e, user_data=bytes(range(64)),
                               vm_configuration=emuhcl.DEFAULT_VM_CONFIGURATION)
    assert b" " not in data  # compact, like the paravisor's
    doc = json.loads(data)
    assert list(doc) == ["keys", "vm-configuration", "user-data"]
    assert list(doc["keys"][0]) == ["kid", "key_ops", "kty", "e", "n"]
    assert doc["keys"][0]["e"] == "AQAB"
    assert doc["user-data"] == bytes(range(64)).hex().upper()
    ak = hcl.find_ak(hcl.parse_runtime_json(data))
    assert (ak.n, ak.e) == (n, e)
    with pytest.raises(ValueError):
        emuhcl.runtime_json(n, e, user_data=bytes(32), vm_configuration={})


def test_hcl_report_round_trips(state: EmulatorState, ak_numbers: Tuple[int, int]) -> None:
    runtime = emuhcl.runtime_json(*ak_numbers, user_data=b"\x07" * 64,
                                  vm_configuration=emuhcl.DEFAULT_VM_CONFIGURATION)
    blob = emuhcl.build_hcl_report(Firmware(state), runtime, size=2048)
    assert len(blob) == 2048
    report = hcl.HclReport.from_bytes(blob)
    assert report.runtime_data == runtime
    assert report.user_data == b"\x07" * 64
    assert report.vm_configuration == dict(emuhcl.DEFAULT_VM_CONFIGURATION)
    assert report.report_size == hcl.RUNTIME_DATA_OFFSET + len(runtime)
    assert report.data_size == 20 + len(runtime)
    assert (report.ak.n, report.ak.e) == ak_numbers
    report_data = report.snp_report[0x50:0x90]
    assert report_data == hashlib.sha256(runtime).digest() + bytes(32)
    assert int.from_bytes(report.snp_report[0x30:0x34], "little") == 0  # VMPL 0
    assert blob[hcl.RUNTIME_DATA_OFFSET + len(runtime):] == bytes(2048 - report.report_size)


def test_hcl_report_must_fit(state: EmulatorState, ak_numbers: Tuple[int, int]) -> None:
    runtime = emuhcl.runtime_json(*ak_numbers, user_data=bytes(64), vm_configuration={})
    with pytest.raises(ValueError):
        emuhcl.build_hcl_report(Firmware(state), runtime, size=hcl.RUNTIME_DATA_OFFSET)


def test_a_wrong_variable_data_size_is_a_format_error(state: EmulatorState,
                                                      ak_numbers: Tuple[int, int]) -> None:
    runtime = emuhcl.runtime_json(*ak_numbers, user_data=bytes(64), vm_configuration={})
    blob = bytearray(emuhcl.build_hcl_report(Firmware(state), runtime, size=2048))
    blob[hcl.REQUEST_DATA_OFFSET + 16:hcl.REQUEST_DATA_OFFSET + 20] = (5000).to_bytes(4, "little")
    with pytest.raises(EvidenceFormatError):
        hcl.HclReport.from_bytes(bytes(blob))


