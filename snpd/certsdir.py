"""snpguest-style certificate directories: read and write ``ark``, ``ask``/``asvk``,
``vcek``/``vlek`` and ``crl`` as ``.pem`` or ``.der`` files.

This is the shell around :class:`snpd.trust.certset.CertificateSet`: the only
module here that touches the filesystem for certificates a user hands over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Union

from snpd.errors import InputFileError, InvalidArgument
from snpd.files import atomic_write, read_bounded
from snpd.trust.certset import KINDS, CertificateSet, load_as
from snpd.trust.x509 import Certificate, Crl

MAX_FILE = 1 << 20


class CertsDirError(InputFileError):
    """A certs dir or one of its files is missing or unreadable."""


EXTENSIONS = ("pem", "der", "crt", "cer")


def _pick(names: List[str], wanted: str) -> str:
    """One of the files whose name matches ``wanted`` in any case: the exact
    lower-case name (the one snpguest writes and reads), else the first in
    code-point order, so the choice never depends on the order of the listing."""
    return wanted if wanted in names else min(names)


def load_certs_dir(directory: Union[str, os.PathLike[str]]) -> CertificateSet:
    """Load every ``<kind>.<ext>`` in ``directory``, for each kind of KINDS.

    Names match in any case (``ARK.PEM``, ``Ask.pem``); per kind, ``.pem`` wins over
    ``.der`` (then ``.crt``, ``.cer``) as in snpguest, and among names that differ
    only in case the lower-case one wins, else the first in code-point order.

    A file that cannot be read raises :class:`CertsDirError` (exit 2). A file that is
    read but is not what its name says (an ASK in ``asvk.pem``, a VCEK in
    ``vlek.der``, bytes that are no certificate) is host-supplied evidence that
    fails: it is left out and recorded in the set's ``defects``, which verification
    reports as a failed check.
    """
    root = Path(directory)
    if not root.is_dir():
        raise CertsDirError(f"{root} is not a directory")
    by_name: Dict[str, List[str]] = {}
    try:
        with os.scandir(root) as listing:
            for entry in listing:
                if entry.is_file():
                    by_name.setdefault(entry.name.lower(), []).append(entry.name)
    except OSError as exc:
        raise CertsDirError(f"cannot list {root}: {exc.strerror or exc}") from exc
    found: Dict[str, Union[Certificate, Crl]] = {}
    defects: List[str] = []
    for kind in KINDS:
        for ext in EXTENSIONS:
            wanted = f"{kind}.{ext}"
            names = by_name.get(wanted)
            if not names:
                continue
            name = _pick(names, wanted)
            data = read_bounded(root / name, "certificate file", MAX_FILE)
            item, defect = load_as(kind, data, name)
            if item is not None:
                found[kind] = item
            else:
                defects.append(defect or f"{name}: unusable")
            break
    if not found and not defects:
        raise CertsDirError(f"{root} holds no ark/ask/asvk/vcek/vlek/crl .pem or .der file")
    return CertificateSet(**found).with_defects(defects)  # type: ignore[arg-type]


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
