"""snpguest-style certificate directories: read and write ``ark``, ``ask``/``asvk``,
``vcek``/``vlek`` and ``crl`` as ``.pem`` or ``.der`` files.

This is the shell around :class:`snpd.trust.certset.CertificateSet`: the only
module here that touches the filesystem for certificates a user hands over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Union

from snpd.errors import CertificateFormatError, InputFileError, InvalidArgument
from snpd.files import atomic_write, read_bounded
from snpd.trust.certset import KINDS, CertificateSet, classify
from snpd.trust.x509 import Certificate, Crl, load_certificate, load_crl

MAX_FILE = 1 << 20


class CertsDirError(InputFileError):
    """A certs dir or one of its files is missing or unreadable."""


def load_certs_dir(directory: Union[str, os.PathLike[str]]) -> CertificateSet:
    """Load every ``<kind>.pem`` / ``<kind>.der`` in ``directory`` (.pem wins, as in snpguest).

    A file whose content is not the certificate its name says is an error that
    names the file.
    """
    root = Path(directory)
    if not root.is_dir():
        raise CertsDirError(f"{root} is not a directory")
    found: Dict[str, Union[Certificate, Crl]] = {}
    for kind in KINDS:
        for ext in ("pem", "der", "crt", "cer"):
            path = root / f"{kind}.{ext}"
            if not path.is_file():
                continue
            data = read_bounded(path, "certificate file", MAX_FILE)
            try:
                if kind == "crl":
                    found[kind] = load_crl(data)
                else:
                    cert = load_certificate(data)
                    actual = classify(cert)
                    if actual != kind:
                        raise CertificateFormatError(f"it holds a {actual.upper()} certificate")
                    found[kind] = cert
            except CertificateFormatError as exc:
                raise CertificateFormatError(f"{path}: {exc}") from exc
            break
    if not found:
        raise CertsDirError(f"{root} holds no ark/ask/asvk/vcek/vlek/crl .pem or .der file")
    return CertificateSet(**found)  # type: ignore[arg-type]


def write_certs_dir(directory: Union[str, os.PathLike[str]], certs: CertificateSet,
                    encoding: str) -> List[Path]:
    """Write each certificate of ``certs`` as ``<kind>.<encoding>``; return the paths."""
    if encoding not in ("pem", "der"):
        raise InvalidArgument(f"encoding must be pem or der, not {encoding!r}")
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertsDirError(f"cannot create {root}: {exc.strerror or exc}") from exc
    written = []
    for kind, item in certs.items():
        path = root / f"{kind}.{encoding}"
        data = item.to_pem().encode() if encoding == "pem" else item.der
        try:
            # The named directory is followed as given (it may be a symlink of the
            # caller's); nothing planted in it is (files.atomic_write).
            atomic_write(path, data, within=root)
        except OSError as exc:
            raise CertsDirError(f"cannot write {path}: {exc.strerror or exc}") from exc
        written.append(path)
    return written
