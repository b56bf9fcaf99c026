"""Session fixtures: one emulated platform per product (see emuplatform.py), and the
check that no process a test started outlives the session (see tests/leftovers.py);
``swtpm``, a private real TPM 2.0 per test (see tests/harness/swtpm.py); ``kbs``, the
loopback Trustee KBS of a test module (tests/harness/kbs.py)."""

from __future__ import annotations

from typing import Any, Dict, Iterator

import pytest
from emuplatform import Platform, loopback_kbs, make_platform  # type: ignore[import-not-found]
from harness import swtpm as swtpm_harness  # type: ignore[import-not-found]
from leftovers import no_leftover_processes  # type: ignore[import-not-found]  # noqa: F401

from snpd.abi.product import Product

_PLATFORMS: Dict[Product, Platform] = {}


@pytest.fixture(scope="session", params=list(Product), ids=lambda p: p.value)
def platform(request: Any) -> Platform:
    product: Product = request.param
    if product not in _PLATFORMS:
        _PLATFORMS[product] = make_platform(product)
    return _PLATFORMS[product]


@pytest.fixture(scope="session")
def milan() -> Platform:
    if Product.MILAN not in _PLATFORMS:
        _PLATFORMS[Product.MILAN] = make_platform(Product.MILAN)
    return _PLATFORMS[Product.MILAN]


@pytest.fixture(scope="session")
def genoa() -> Platform:
    if Product.GENOA not in _PLATFORMS:
        _PLATFORMS[Product.GENOA] = make_platform(Product.GENOA)
    return _PLATFORMS[Product.GENOA]


@pytest.fixture(scope="session")
def turin() -> Platform:
    if Product.TURIN not in _PLATFORMS:
        _PLATFORMS[Product.TURIN] = make_platform(Product.TURIN)
    return _PLATFORMS[Product.TURIN]


@pytest.fixture(scope="session")
def swtpm_installed() -> None:
    """swtpm is the tests' vTPM, not hardware: without it the test fails (scripts/test
    and the package build's Build-Depends install it), never skips."""
    if not swtpm_harness.available():
        pytest.fail("swtpm is not installed: scripts/test installs it (apt-get install swtpm)")


@pytest.fixture
def swtpm(swtpm_installed: None) -> Iterator[Any]:
    """A fresh swtpm on a unix socket (``.spec`` for snpd.device.tpm.open_tpm), stopped
    and reaped after the test."""
    with swtpm_harness.Swtpm() as tpm:
        yield tpm


@pytest.fixture(scope="module")
def kbs(milan: Platform, tmp_path_factory: pytest.TempPathFactory,
        request: pytest.FixtureRequest) -> Iterator[Any]:
    """The loopback KBS for a test module: it verifies Milan's emulated evidence and
    serves the module's ``RESOURCES``; made once per module (its keys are slow), its
    knobs and counters reset after every test."""
    with loopback_kbs(milan, tmp_path_factory.mktemp("kbs"), request.module.RESOURCES
                      ) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_kbs(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "kbs" in request.fixturenames:
        request.getfixturevalue("kbs").reset()
