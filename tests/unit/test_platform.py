"""The typed platform hook: what a backend knows of the platform beneath it."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from snpd.abi.product import Product
from snpd.device.base import Platform, ReportRequest
from snpd.device.configfs import ConfigfsDevice
from snpd.device.ioctl import IoctlDevice
from snpd.device.select import open_emulator
from snpd.device.unavailable import UnavailableDevice
from snpd.emulator.kernel import EmulatedSevGuest
from snpd.emulator.launch import EmulatorConfig
from snpd.errors import DeviceUnavailable

NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.timezone.utc)


def test_hardware_backends_know_nothing_more() -> None:
    for device in (IoctlDevice("/nonexistent/sev-guest"), ConfigfsDevice("/nonexistent/tsm"),
                   UnavailableDevice(DeviceUnavailable("no guest"))):
        assert device.platform() == Platform()
    assert Platform().guest_vmpl is None and Platform().extra_roots == ()


def test_unavailable_device_says_why() -> None:
    device = UnavailableDevice(DeviceUnavailable("no guest here"))
    with pytest.raises(DeviceUnavailable, match="no guest here"):
        device.report(ReportRequest(bytes(64), 0))
    assert device.describe() == {"backend": "none", "error": "no guest here"}


def test_the_emulator_describes_its_guest(tmp_path: Path) -> None:
    config = EmulatorConfig(product=Product.MILAN, guest_vmpl=2, device="absent")
    kernel = EmulatedSevGuest.for_state_dir(tmp_path, config, now=lambda: NOW, rsa_bits=2048)
    device = open_emulator(tmp_path, config)
    platform = device.platform()
    assert platform.emulated
    assert (platform.guest_vmpl, platform.product) == (2, Product.MILAN)
    assert platform.device_node is False
    assert [root.der for root in platform.extra_roots] == [kernel.firmware.state.ark.der]
    assert platform.driver_log  # the emulated driver logged its probe
    device.close()
