"""An emulated KDS: the emulator's chain, VCEK and CRL in AMD's KDS URL layout.

What ``snpd-emu kds`` serves on 127.0.0.1, and what the tests and the demo point
snpctl and the daemon at instead of AMD.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Sequence, Tuple

from snpd.abi.product import Endorser
from snpd.emulator.state import EmulatorState
from snpd.kds import urls
from snpd.kds.thim import THIM_PATH, tcbm_text
from snpd.trust.x509 import Certificate

PEM = "application/x-pem-file"
DER = "application/pkix-cert"
CRL = "application/pkix-crl"
JSON = "application/json"


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


def thim_json(vcek: Certificate, tcbm: int, chain: Sequence[Certificate]) -> bytes:
    """A THIM answer (Azure IMDS ``/metadata/THIM/amd/certification``): ``vcek`` and
    ``chain`` (ASK, then ARK) in PEM, ``tcbm`` the REPORTED_TCB u64 it is for."""
    return json.dumps({"vcekCert": vcek.to_pem(), "tcbm": tcbm_text(tcbm),
                       "certificateChain": "".join(c.to_pem() for c in chain),
                       "cacheControl": "86400"}).encode()


def thim_document(state: EmulatorState, *, vcek: Optional[Certificate] = None,
                  tcbm: Optional[int] = None,
                  chain: Optional[Sequence[Certificate]] = None) -> bytes:
    """What THIM answers for the emulated host: its VCEK, reported TCB and chain; any
    of them replaced for a test of what a wrong answer does."""
    return thim_json(vcek if vcek is not None else state.vcek,
                     tcbm if tcbm is not None else state.config.tcb("reported").raw,
                     chain if chain is not None else (state.ask, state.ark))


def thim_store(state: EmulatorState, document: Optional[bytes] = None
               ) -> Dict[str, Tuple[str, bytes]]:
    """{THIM path: (content type, ``document`` or the host's THIM document)} for a
    KdsServer standing in for THIM."""
    return {THIM_PATH: (JSON, document if document is not None else thim_document(state))}
