"""An emulated KDS: the emulator's chain, VCEK and CRL in AMD's KDS URL layout.

What ``snpd-emu kds`` serves on 127.0.0.1, and what the tests and the demo point
snpctl and the daemon at instead of AMD.
"""

from __future__ import annotations

from typing import Dict, Tuple

from snpd.abi.product import Endorser
from snpd.emulator.state import EmulatorState
from snpd.kds import urls

PEM = "application/x-pem-file"
DER = "application/pkix-cert"
CRL = "application/pkix-crl"


def kds_store(state: EmulatorState) -> Dict[str, Tuple[str, bytes]]:
    """{path: (content type, body)} for a KdsServer."""
    product = state.config.product
    store = {
        urls.cert_chain_path(product, Endorser.VCEK): (
            PEM, (state.ask.to_pem() + state.ark.to_pem()).encode()),
        urls.cert_chain_path(product, Endorser.VLEK): (
            PEM, (state.asvk.to_pem() + state.ark.to_pem()).encode()),
        urls.crl_path(product, Endorser.VCEK): (CRL, state.crl.der),
        urls.crl_path(product, Endorser.VLEK): (CRL, state.crl.der),
        urls.vcek_path(product, state.chip_id, state.config.tcb("reported")): (
            DER, state.vcek.der),
    }
    return store
