"""Session fixtures: one emulated platform per product (see emuplatform.py), and the
check that no process a test started outlives the session (see tests/leftovers.py)."""

from __future__ import annotations

from typing import Any, Dict

import pytest
from emuplatform import Platform, make_platform  # type: ignore[import-not-found]
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
