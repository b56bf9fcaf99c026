"""Helpers for the crash-safety and fault-matrix suites: a KDS in the test process
serving the emulator's certificates, a daemon sharing one cache directory across
restarts, varlink calls that report typed errors, and a scan of the KDS cache that
admits every file the way snpd's own cache does (snpd/kds/cache.py)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pwd
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from daemonproc import (  # type: ignore[import-not-found]
    DAEMON_USER,
    DEADLINE,
    EmulatorTemplate,
    SnpdDaemon,
    merge,
)

from snpd.abi.product import Endorser
from snpd.emulator.kds import kds_store
from snpd.emulator.kds_server import KdsServer
from snpd.errors import CertificateFormatError, UntrustedCertificate
from snpd.files import TMP_SUFFIX
from snpd.trust.admission import check_ca_chain, check_crl, check_vcek_binding
from snpd.trust.roots import TrustRoots
from snpd.trust.x509 import load_certificate, load_crl

A, K, M = "org.snpd.Attestation.", "org.snpd.Keys.", "org.snpd.Manager."
# A bus address nothing listens on: these suites use varlink only (D-Bus off).
NO_BUS = "unix:path=/nonexistent/snpd-test-no-bus"
TMP_RE = re.compile(r"^\..+\.\d+" + re.escape(TMP_SUFFIX) + r"$")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def emulator_kds(template: EmulatorTemplate) -> KdsServer:
    """A started KdsServer in this process serving the template's chain, VCEK and CRL."""
    return KdsServer(kds_store(template.state)).start()


def shared_cache_dir() -> Path:
    """A fresh cache directory owned by snpd (mode 0700) under a 0755 parent."""
    pw = pwd.getpwnam(DAEMON_USER)
    parent = Path(tempfile.mkdtemp(prefix="snpd-cache-"))
    parent.chmod(0o755)
    cache = parent / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, pw.pw_uid, pw.pw_gid)
    return cache


def new_daemon(template: EmulatorTemplate, kds_url: str, cache_dir: Path,
               config: Optional[Mapping[str, Mapping[str, Any]]] = None) -> SnpdDaemon:
    """A daemon (not started) on varlink only, with ``cache_dir`` as its KDS cache."""
    return SnpdDaemon(NO_BUS, template, kds_url, config=merge(
        {"dbus": {"enabled": False}, "kds": {"cache_dir": str(cache_dir)}}, config or {}))


# -- calls ---------------------------------------------------------------------------------------


def call(daemon: SnpdDaemon, method: str, **parameters: Any) -> Dict[str, Any]:
    """One varlink call as root (plain framing, one connection): ``{"ok": True,
    "parameters": ...}`` or ``{"ok": False, "error": short name (InvalidArgument, ...),
    "parameters": ...}``."""
    request = json.dumps({"method": method, "parameters": parameters}).encode() + b"\0"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(daemon.socket_path))
        sock.sendall(request)
        buffer = b""
        while b"\0" not in buffer:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"{method}: the daemon closed the connection")
            buffer += chunk
    reply = json.loads(buffer.partition(b"\0")[0])
    if "error" in reply:
        return {"ok": False, "error": str(reply["error"]).rpartition(".")[2],
                "parameters": reply.get("parameters", {})}
    return {"ok": True, "parameters": reply.get("parameters", {})}


def outcome(result: Mapping[str, Any]) -> str:
    """"ok" or the error's short name."""
    return "ok" if result["ok"] else str(result["error"])


# -- the cache scan ---------------------------------------------------------------------------


@dataclasses.dataclass
class Scan:
    entries: List[str]  # relative paths of admitted entries
    temporaries: List[Path]  # leftover ``.name.PID.tmp`` files
    problems: List[str]


def scan_cache(cache_dir: Path, template: EmulatorTemplate,
               forbidden: Sequence[bytes] = ()) -> Scan:
    """Admit every file under ``cache_dir`` as snpd's cache would when reading it, against
    the emulator's root only. Anything else (a partial or unverifiable file, a file
    outside the layout, one of the ``forbidden`` bodies) is a problem; temporaries are
    listed separately (a crash may leave them until the next start)."""
    state = template.state
    product = state.config.product
    roots = TrustRoots(explicit=(state.ark,))
    chip_id = state.chip_id
    tcb = state.config.tcb("reported")
    hwid = chip_id[:product.hwid_length].hex()
    base = cache_dir / product.value
    scan = Scan([], [], [])
    for path in sorted(p for p in cache_dir.rglob("*") if not p.is_dir()):
        rel = str(path.relative_to(cache_dir))
        if TMP_RE.match(path.name):
            scan.temporaries.append(path)
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            scan.problems.append(f"{rel}: unreadable ({exc})")
            continue
        if any(data == bad for bad in forbidden):
            scan.problems.append(f"{rel}: a forbidden (forged) body was stored")
            continue
        try:
            if path == base / "vcek" / "ark.pem":
                check_ca_chain([load_certificate(data), state.ask], product, Endorser.VCEK,
                               roots=roots)
            elif path == base / "vcek" / "ask.pem":
                check_ca_chain([state.ark, load_certificate(data)], product, Endorser.VCEK,
                               roots=roots)
            elif path == base / "vlek" / "ark.pem":
                check_ca_chain([load_certificate(data), state.asvk], product, Endorser.VLEK,
                               roots=roots)
            elif path == base / "vlek" / "asvk.pem":
                check_ca_chain([state.ark, load_certificate(data)], product, Endorser.VLEK,
                               roots=roots)
            elif path.name == "crl.der" and path.parent in (base / "vcek", base / "vlek"):
                check_crl(load_crl(data), state.ark, product, roots=roots)
            elif path == base / "vcek" / "chips" / hwid / f"{tcb.raw:016x}.der":
                check_vcek_binding(load_certificate(data), product, chip_id, tcb,
                                   intermediate=state.ask)
            else:
                scan.problems.append(f"{rel}: not a cache entry snpd would store")
                continue
        except (CertificateFormatError, UntrustedCertificate, ValueError) as exc:
            scan.problems.append(f"{rel}: does not load and verify: "
                                 f"{type(exc).__name__}: {exc}")
            continue
        scan.entries.append(rel)
    return scan
