"""snpctl: the snpguest workflow, done correctly.

``display report|key``, ``fetch ca|vcek|crl``, ``verify certs|attestation``.
Exit codes: 0 success, 1 a check failed (an invalid report, one that does not
parse), 2 usage or unreadable input, 3 daemon, device or KDS unavailable.

Start-up time matters (a verifier in a shell loop): this module imports only
the standard library at load time; each command imports what it needs.
"""

from __future__ import annotations

import os
import sys

from snpd import __version__
from snpd.cli import fastpath
from snpd.cli.common import (
    Output,
    OutputFileError,
    UsageError,
    check_output,
    choice,
    read_file,
    write_file,
)
from snpd.errors import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CertificateFormatError,
    NotSupported,
    ReportFormatError,
    SnpdError,
)

TYPE_CHECKING = False  # see snpd/__init__.py: the client path does not import typing
if TYPE_CHECKING:
    import argparse
    import datetime
    from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

    from snpd.abi.product import Endorser, Product
    from snpd.abi.report import AttestationReport
    from snpd.kds.client import KdsClient
    from snpd.trust.result import Verdict
    from snpd.trust.x509 import Certificate
else:
    class _Argparse:
        """Stands for the argparse module until first used, then is replaced by it.
        status and report parse without it (snpd.cli.fastpath): argparse and the re,
        enum and gettext modules it imports cost a third of their 25 ms budget."""

        def __getattr__(self, name: str) -> object:
            import argparse as module  # lazy: argparse is imported on first use, see above

            globals()["argparse"] = module
            return getattr(module, name)

    argparse = _Argparse()

PRODUCTS = ("Milan", "Genoa", "Turin")
# snpguest's processor models: Bergamo and Siena are Genoa parts, filed by the KDS
# under Genoa; names are matched in any case, as snpguest's clap enums are.
PROCESSOR_MODELS = ("Milan", "Genoa", "Bergamo", "Siena", "Turin")
_KDS_PRODUCT = {"bergamo": "Genoa", "siena": "Genoa"}


def kds_product(name: str) -> str:
    """The KDS product a processor model is filed under (Bergamo, Siena → Genoa)."""
    return _KDS_PRODUCT.get(name.lower(), name)


def _path(name: str) -> Any:
    """pathlib only when a command needs it: snpctl's start-up time is a budget."""
    from pathlib import Path  # lazy: pathlib imports re: 10 ms of snpctl report's 25

    return Path(name)


def read_head(name: str, what: str, size: int) -> bytes:
    """The first ``size`` bytes of a file, as snpguest reads its request file."""
    try:
        with open(name, "rb") as f:
            return f.read(size)
    except OSError as exc:
        raise OutputFileError(f"cannot read {what} {name}: {exc.strerror or exc}") from None


# -- argument helpers ------------------------------------------------------------


def parse_time(text: str) -> datetime.datetime:
    """RFC 3339, e.g. ``2025-06-01T00:00:00Z``; a time without a zone is refused."""
    import datetime  # lazy: datetime only for --at (docs/contracts.md: 25 ms)

    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 time such as 2025-06-01T00:00:00Z") from exc
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add Z or an offset")
    return parsed.astimezone(datetime.timezone.utc)


def load_report(path: str) -> AttestationReport:
    # lazy: snpd.abi imports dataclasses and typing (25 ms budget)
    from snpd.abi.report import AttestationReport

    return AttestationReport.from_bytes(read_file(path, "report"))


def product_arg(name: Optional[str]) -> Optional[Product]:
    if name is None:
        return None
    # lazy: snpd.abi imports dataclasses and typing (25 ms budget)
    from snpd.abi.product import Product

    return Product.parse(kds_product(name))


TRUST_ROOT_ENV = "SNPD_TRUST_ROOT"
KDS_URL_ENV = "SNPD_KDS_URL"


def trust_root_env() -> List[str]:
    """Roots named in $SNPD_TRUST_ROOT (``:``-separated), trusted like --trust-root:
    how an snpguest command line, which has no such flag, runs against another
    root (the emulator's). Announced on stderr each time, so it is never silent."""
    value = os.environ.get(TRUST_ROOT_ENV, "")
    paths = [p for p in value.split(os.pathsep) if p]
    if paths:
        print(f"snpctl: also trusting the root in {', '.join(paths)} (${TRUST_ROOT_ENV})",
              file=sys.stderr)
    return paths


def trust_roots(paths: Sequence[str]) -> List[Certificate]:
    # lazy: the trust core and cryptography only for commands that verify
    from snpd.trust.x509 import load_certificates

    roots: List[Certificate] = []
    for path in list(paths) + trust_root_env():
        roots.extend(load_certificates(read_file(path, "trust root")))
    return roots


# -- display -------------------------------------------------------------------------


def cmd_display_report(args: argparse.Namespace, out: Output) -> int:
    try:
        report = load_report(args.file)
    except ReportFormatError as exc:
        out.warn(f"{args.file}: {exc}")
        out.json({"file": args.file, "error": str(exc)})
        return EXIT_CHECK_FAILED
    doc = report.to_json(product_arg(args.product))
    out.json(doc)
    if not out.as_json:
        render_report(doc, out)
    return EXIT_OK


# Fields an older report version does not have (CPUID from v3, mitigation
# vectors from v5): shown as "n/a (vN)" rather than as if they were zero.
_VERSIONED_FIELDS = frozenset({"cpuid_fam_id", "cpuid_mod_id", "cpuid_step",
                               "launch_mit_vector", "current_mit_vector"})


def render_report(doc: Dict[str, Any], out: Output) -> None:
    absent = f"n/a (v{doc.get('version')})"

    def show(key: str, value: Any, indent: int = 0) -> None:
        pad = "  " * indent
        if value is None and key in _VERSIONED_FIELDS:
            value = absent
        elif value is None and key == "product":
            value = "unknown (a v2 report names no CPU; give -p/--processor-model)"
        if isinstance(value, dict):
            out.line(f"{pad}{key}:")
            for k, v in value.items():
                show(k, v, indent + 1)
        elif isinstance(value, str) and len(value) > 64:
            out.line(f"{pad}{key}:")
            for i in range(0, len(value), 64):
                out.line(f"{pad}  {value[i:i + 64]}")
        else:
            out.line(f"{pad}{key}: {value}")

    for key, value in doc.items():
        show(key, value)


def cmd_display_key(args: argparse.Namespace, out: Output) -> int:
    data = read_file(args.file, "key", limit=4096)
    if len(data) != 32:
        raise OutputFileError(f"{args.file} holds {len(data)} bytes; a derived key is 32")
    out.json({"file": args.file, "length": len(data), "key": data.hex()})
    for i in range(0, len(data), 16):
        out.line(" ".join(f"{b:02x}" for b in data[i:i + 16]))
    return EXIT_OK


# -- verify ----------------------------------------------------------------------------


def render_verdict(verdict: Verdict, out: Output, subject: str,
                   shown: Optional[Verdict] = None, scope: str = "") -> None:
    """One line per check, then the outcome. A partial verdict (checks skipped on
    request) is never "VALID": when every check that ran passed it is "PASSED", with
    the scope and the skipped checks named in the same line."""
    mark = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP"}
    for check in (verdict if shown is None else shown).checks:  # a Verdict's bool is validity
        out.line(f"  {mark[check.status.value]}  {check.name:<26} {check.detail}")
    product = f" ({verdict.product})" if verdict.product else ""
    partial = (f" ({scope or 'partial'}; skipped: {', '.join(verdict.omitted)})"
               if verdict.partial else "")
    if verdict.valid:
        out.result(f"VALID: {subject}{product}")
    elif verdict.partial and verdict.passed:
        out.result(f"PASSED{partial}: {subject}{product}")
    else:
        failed = ", ".join(c.name for c in verdict.failures) or "no check could run"
        out.result(f"INVALID{partial}: {subject}{product}: failed {failed}")


def _verifier(args: argparse.Namespace) -> Any:
    # lazy: the trust core and cryptography only for commands that verify
    from snpd.trust.roots import AMD_ROOTS
    from snpd.trust.verify import Verifier

    roots = AMD_ROOTS.with_explicit(*trust_roots(args.trust_root))
    return Verifier(roots)


def cmd_verify_certs(args: argparse.Namespace, out: Output) -> int:
    # lazy: certs dirs (pathlib, snpd.trust) only for the commands that use one
    from snpd.certsdir import load_certs_dir
    from snpd.trust.result import Verdict

    certs = load_certs_dir(args.dir)
    verdict = _verifier(args).verify_chain(certs, at=args.at)
    # A chain alone has no report signature: leave that line out of what users see.
    shown = Verdict(tuple(c for c in verdict.checks if c.name != "report.signature"), None,
                    verdict.product)
    out.json({**shown.to_json(), "valid": verdict.valid})
    render_verdict(verdict, out, f"certificate chain in {args.dir}", shown)
    return EXIT_OK if verdict.valid else EXIT_CHECK_FAILED


def cmd_verify_attestation(args: argparse.Namespace, out: Output) -> int:
    """snpguest's ``verify attestation``, flags and all; the chain is always checked.

    ``-t``/``-s`` leave out the signature or the TCB binding: the verdict is then
    partial, exits 0 when every check that ran passed (as snpguest does) and is
    never reported as valid. ``-m``/``-d``/``-r``/``--id-key-digest``/
    ``--author-key-digest`` are an appraisal policy of exact values, appraised after
    the ``--policy`` file's."""
    # lazy: certs dirs (pathlib, snpd.trust) only for the commands that use one
    from snpd.certsdir import load_certs_dir

    policies: List[Any] = []
    flags = (("measurement", "-m/--measurement"), ("host_data", "-d/--host-data"),
             ("report_data", "-r/--report-data"), ("id_key_digest", "--id-key-digest"),
             ("author_key_digest", "--author-key-digest"))
    if any(getattr(args, field) is not None for field, _ in flags):
        # lazy: policies (snpd.schema: json, re, enum) only when one is given
        from snpd.trust.appraisal import AppraisalPolicy, expected_value

        policies.append(AppraisalPolicy.expecting({
            field: expected_value(getattr(args, field), field, flag=flag)
            for field, flag in flags if getattr(args, field) is not None}))
    certs = load_certs_dir(args.dir)
    report = read_file(args.report, "report")
    if args.policy:
        # lazy: policies (snpd.schema: json, re, enum) only when one is given
        from snpd.trust.appraisal import AppraisalPolicy

        text = read_file(args.policy, "policy").decode("utf-8", "replace")
        policies.insert(0, AppraisalPolicy.from_toml(text, name=os.path.basename(args.policy)))
    skip: Sequence[str] = ()
    scope = ""
    if args.tcb or args.signature:
        # lazy: the trust core and cryptography only for commands that verify
        from snpd.trust.verify import SIGNATURE_ONLY, TCB_ONLY

        skip, scope = (TCB_ONLY, "TCB only") if args.tcb else (SIGNATURE_ONLY, "signature only")
    verdict = _verifier(args).verify(report, certs, at=args.at, policy=policies,
                                     product=product_arg(args.product), skip=skip)
    doc = verdict.to_json()
    doc["report"] = args.report
    import datetime  # lazy: not at module level, where every start would pay for it

    doc["at"] = (args.at or datetime.datetime.now(datetime.timezone.utc)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    out.json(doc)
    render_verdict(verdict, out, f"{args.report} with the chain in {args.dir}", scope=scope)
    return EXIT_OK if verdict.valid or (verdict.partial and verdict.passed) else (
        EXIT_CHECK_FAILED)


def cmd_verify_evidence(args: argparse.Namespace, out: Output) -> int:
    """Azure vTPM evidence (Trustee's az-snp-vtpm, v0-v2) for the nonce in a file: the
    SNP report and chain as ``verify attestation`` checks them, the runtime data
    REPORT_DATA binds, and the vTPM quote over the nonce and PCRs. The certs dir needs
    the ARK and ASK; the VCEK may come from the evidence. Exit codes as ``verify
    attestation``."""
    # lazy: certs dirs, the trust core and cryptography only for commands that verify
    from snpd.certsdir import load_certs_dir
    from snpd.service import MAX_EVIDENCE, MAX_NONCE
    from snpd.trust.azure import verify_azure_evidence

    certs = load_certs_dir(args.dir)
    evidence = read_file(args.evidence, "evidence", MAX_EVIDENCE)
    nonce = read_file(args.nonce_file, "nonce", MAX_NONCE)
    policies: List[Any] = []
    if args.policy:
        # lazy: policies (snpd.schema: json, re, enum) only when one is given
        from snpd.trust.appraisal import AppraisalPolicy

        text = read_file(args.policy, "policy").decode("utf-8", "replace")
        policies.append(AppraisalPolicy.from_toml(text, name=os.path.basename(args.policy)))
    verdict = verify_azure_evidence(evidence, certs, nonce, verifier=_verifier(args),
                                    at=args.at, product=product_arg(args.product),
                                    policy=policies)
    doc = verdict.to_json()
    doc["evidence"] = args.evidence
    import datetime  # lazy: not at module level, where every start would pay for it

    doc["at"] = (args.at or datetime.datetime.now(datetime.timezone.utc)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    out.json(doc)
    render_verdict(verdict, out, f"{args.evidence} with the chain in {args.dir}")
    return EXIT_OK if verdict.valid else EXIT_CHECK_FAILED


# -- fetch ------------------------------------------------------------------------------


def _kds(args: argparse.Namespace) -> KdsClient:
    # lazy: requests only for fetch (verify must not import it, test_snpctl)
    from snpd.kds.client import KdsClient

    return KdsClient(base_url=args.kds_url, deadline=args.timeout)


def _product_for_fetch(args: argparse.Namespace) -> Product:
    """The product from --report (v3+ CPUID) or the positional/--product name."""
    # lazy: snpd.abi imports dataclasses and typing (25 ms budget)
    from snpd.abi.product import Product

    name = getattr(args, "product", None) or getattr(args, "product_opt", None)
    if getattr(args, "report", None):
        report = load_report(args.report)
        found = report.cpuid_product
        if found is None and name is None:
            raise UsageError(f"{args.report} (version {report.version}) does not name its CPU; "
                             f"give the product ({', '.join(PRODUCTS)})")
        if found is not None and name is not None and product_arg(name) is not found:
            raise UsageError(f"processor model {name} contradicts the report's CPU ({found})")
        if found is not None:
            return found
    if name is None:
        raise UsageError(f"give a processor model ({', '.join(PROCESSOR_MODELS)}) or "
                         "-r/--report FILE")
    return Product.parse(kds_product(name))


def _endorser(name: str) -> Endorser:
    # lazy: snpd.abi imports dataclasses and typing (25 ms budget)
    from snpd.abi.product import Endorser

    return Endorser(name)


def cmd_fetch_ca(args: argparse.Namespace, out: Output) -> int:
    # lazy: certs dirs (pathlib, snpd.trust) only for the commands that use one
    from snpd.certsdir import write_certs_dir
    from snpd.trust.admission import check_ca_chain
    from snpd.trust.certset import CertificateSet
    from snpd.trust.x509 import load_certificates

    product = _product_for_fetch(args)
    endorser = _endorser(args.endorser)
    with _kds(args) as kds:
        body = kds.fetch_cert_chain(product, endorser)
    certs = load_certificates(body)
    extra = trust_roots(args.trust_root)
    ark, inter = check_ca_chain(certs, product, endorser, extra)
    certset = (CertificateSet(ark=ark, ask=inter) if endorser.intermediate == "ask"
               else CertificateSet(ark=ark, asvk=inter))
    paths = write_certs_dir(args.dir, certset, args.encoding)
    out.json({"product": product.value, "endorser": endorser.value,
              "written": [str(p) for p in paths]})
    anchor = "the given trust root" if any(r.der == ark.der for r in extra) else \
        "the pinned AMD ARK"
    out.result(f"wrote {', '.join(str(p) for p in paths)} ({product} {endorser.name} chain, "
               f"verified against {anchor})")
    return EXIT_OK


def cmd_fetch_vcek(args: argparse.Namespace, out: Output) -> int:
    # lazy: certs dirs (pathlib, snpd.trust) only for the commands that use one
    from snpd.abi.tcb import TcbVersion
    from snpd.certsdir import write_certs_dir
    from snpd.trust.admission import check_vcek_binding
    from snpd.trust.certset import CertificateSet
    from snpd.trust.x509 import load_certificate

    report = load_report(args.report_file)
    given = product_arg(args.product)
    if given is not None and report.cpuid_product not in (None, given):
        raise UsageError(f"-p {args.product} contradicts {args.report_file}'s CPU "
                         f"({report.cpuid_product})")
    product = given or report.cpuid_product
    if product is None:
        raise UsageError(f"{args.report_file} (version {report.version}) does not name its CPU; "
                         f"give -p/--processor-model ({', '.join(PROCESSOR_MODELS)})")
    if report.chip_id_masked:
        raise UsageError(f"{args.report_file} has a masked (all-zero) CHIP_ID: the KDS cannot "
                         "serve a VCEK for it (VLEK-signed reports need the CSP's VLEK)")
    tcb = TcbVersion.decode(report.reported_tcb, product)
    with _kds(args) as kds:
        cert = load_certificate(kds.fetch_vcek(product, report.chip_id, tcb))
    check_vcek_binding(cert, product, report.chip_id, tcb)
    paths = write_certs_dir(args.dir, CertificateSet(vcek=cert), args.encoding)
    out.json({"product": product.value, "reported_tcb": tcb.to_json(),
              "written": [str(p) for p in paths]})
    out.result(f"wrote {paths[0]} ({product} VCEK for TCB {tcb})")
    return EXIT_OK


def cmd_fetch_crl(args: argparse.Namespace, out: Output) -> int:
    # lazy: certs dirs (pathlib, snpd.trust) only for the commands that use one
    from snpd.certsdir import CertsDirError, load_certs_dir, write_certs_dir
    from snpd.trust.admission import check_crl
    from snpd.trust.certset import CertificateSet
    from snpd.trust.x509 import load_crl

    product = _product_for_fetch(args)
    endorser = _endorser(args.endorser)
    with _kds(args) as kds:
        crl = load_crl(kds.fetch_crl(product, endorser))
    ark = None
    try:
        ark = load_certs_dir(args.dir).ark
    except (CertsDirError, SnpdError):
        ark = None
    verified = False
    if ark is not None:
        check_crl(crl, ark, product, trust_roots(args.trust_root))
        verified = True
    else:
        out.warn(f"no ark.pem/ark.der in {args.dir}: the CRL's signature was not checked "
                 "(run 'snpctl fetch ca' first)")
    paths = write_certs_dir(args.dir, CertificateSet(crl=crl), args.encoding)
    out.json({"product": product.value, "endorser": endorser.value, "verified": verified,
              "revoked_serials": sorted(crl.revoked_serials),
              "next_update": crl.next_update.strftime("%Y-%m-%dT%H:%M:%SZ")
              if crl.next_update else None,
              "written": [str(p) for p in paths]})
    out.result(f"wrote {paths[0]} ({product} {endorser.name} CRL"
               f"{', signature verified against the ARK' if verified else ', NOT verified'})")
    return EXIT_OK


# -- firmware (direct mode) -----------------------------------------------------------------


def _direct(args: argparse.Namespace) -> bool:
    return bool(args.direct or args.backend is not None or args.emulator_dir)


def _device(args: argparse.Namespace) -> Any:
    """The backend for --direct."""
    from snpd.device.select import open_device  # lazy: the device backends only for --direct

    emulator_dir = _path(args.emulator_dir) if args.emulator_dir else None
    backend = args.backend or ("emulator" if emulator_dir else "auto")
    try:
        return open_device(backend, path=args.device, configfs_root=args.configfs_root,
                           emulator_dir=emulator_dir)
    except OSError as exc:
        where = f"the emulator state in {emulator_dir}" if backend == "emulator" else \
            f"the {backend} backend"
        raise OutputFileError(f"cannot open {where}: {exc.strerror or exc}"
                              + (f" ({exc.filename})" if exc.filename else "")) from None


def _client(args: argparse.Namespace) -> Any:
    """The daemon: varlink when its socket answers, else D-Bus (exit 3 if neither)."""
    # lazy: offline commands (display, verify, fetch) need no client
    from snpd.client import SnpdClient

    return SnpdClient(socket=args.socket, bus=args.bus)


class _GuestVmpl:
    """A key request whose VMPL the daemon fills in (the guest's own)."""

    def __init__(self, request: Any) -> None:
        self.root_key, self.fields = request.root_key, request.fields
        self.guest_svn, self.tcb_version, self.vmpl = request.guest_svn, \
            request.tcb_version, None


class _DaemonDevice:
    """The daemon behind the Device-like calls the commands make."""

    name = "daemon"

    def __init__(self, args: argparse.Namespace) -> None:
        self.client = _client(args)
        self.name = f"daemon ({self.client.transport})"

    def report(self, data: bytes, vmpl: Optional[int]) -> bytes:
        result: bytes = self.client.get_report(data, vmpl)
        return result

    def extended_report(self, data: bytes, vmpl: Optional[int]) -> Any:
        return self.client.get_extended_report(data, vmpl)

    def derived_key(self, request: Any) -> bytes:
        result: bytes = self.client.derive_key(request.root_key.value, request.fields,
                                               request.vmpl, request.guest_svn,
                                               request.tcb_version)
        return result

    def close(self) -> None:
        self.client.close()


def _default_vmpl(args: argparse.Namespace, device: Any) -> Any:
    """The guest's own VMPL: asking for another is how snpguest users meet 0x16."""
    if args.vmpl is not None:
        return int(args.vmpl)
    if isinstance(device, _DaemonDevice):
        return None  # the daemon knows the guest's VMPL
    guest_vmpl = device.platform().guest_vmpl  # the emulator knows its guest's
    if guest_vmpl is not None:
        return int(guest_vmpl)
    from snpd.status.probe import probe  # lazy: the probe only for --direct without an emulator

    return probe(kernel_lines=[]).vmpl or 0


def parse_vmpl(report: bytes) -> int:
    """The report's VMPL. A report that AttestationReport.from_bytes accepts for sure
    (1184 bytes of version 2 to 5) is read in place: snpd.abi's import (dataclasses,
    typing) is longer than snpctl report's whole budget. Anything else is parsed by
    it, for its error; tests/unit/test_snpctl_fastpath.py holds the two together."""
    if isinstance(report, bytes) and len(report) == 0x4A0 \
            and 2 <= int.from_bytes(report[:4], "little") <= 5:
        return int.from_bytes(report[0x30:0x34], "little")
    # lazy: snpd.abi imports dataclasses and typing (25 ms budget)
    from snpd.abi.report import AttestationReport

    return AttestationReport.from_bytes(report).vmpl


REPORT_DATA_SPAN = slice(0x50, 0x90)  # REPORT_DATA in the report (docs/reference/abi.md)


def _platform_binding(device: Any) -> None:
    """``report --platform``: refused unless the report comes from an Azure paravisor
    (REPORT_DATA binds its runtime JSON, the request bytes go in as user-data)."""
    if isinstance(device, _DaemonDevice):
        props = device.client.properties().get("org.snpd.Snpd1.Attestation", {})
        backend = props.get("Backend") or "unknown"
        binding = props.get("ReportDataBinding") or "caller"  # older daemons: no Azure
    else:
        backend, binding = device.name, device.platform().report_data
    if binding != "runtime-data":
        raise NotSupported(
            f"--platform is for Azure confidential VMs, whose paravisor supplies the report "
            f"(the azure backend); the {backend} backend's reports bind the request bytes "
            "themselves, so run without --platform")


def cmd_report(args: argparse.Namespace, out: Output) -> int:
    platform = bool(getattr(args, "platform", False))
    if platform and args.random:
        raise UsageError("--random conflicts with --platform (as in snpguest): with "
                         "--platform, REQUEST_FILE's bytes go to the paravisor and "
                         "REQUEST_FILE then receives the report's REPORT_DATA")
    if args.random:
        data = os.urandom(64)
        check_output(args.request_file, "request file")
    elif platform and not os.path.exists(args.request_file):
        # snpguest --platform sends no bytes: the report as the paravisor holds it
        data = bytes(64)
        check_output(args.request_file, "request file")
    else:
        # snpguest reads the first 64 bytes; a shorter file is zero-padded (snpguest
        # refuses it) so that a nonce of 32 bytes needs no padding by hand.
        data = read_head(args.request_file, "request file", 64).ljust(64, b"\0")
        if platform:
            check_output(args.request_file, "request file")
    check_output(args.report_file, "report")
    device = _device(args) if _direct(args) else _DaemonDevice(args)
    try:
        if platform:
            _platform_binding(device)
        vmpl = _default_vmpl(args, device)
        if isinstance(device, _DaemonDevice):
            report = device.report(data, vmpl)
        else:
            # lazy: the device layer is for --direct; the daemon path's 25 ms budget
            from snpd.device.base import ReportRequest

            report = device.report(ReportRequest(data, vmpl))
        vmpl = parse_vmpl(report)
    finally:
        device.close()
    if args.random:
        write_file(args.request_file, data)
    elif platform:  # as snpguest: what the report binds, for the verifier
        write_file(args.request_file, report[REPORT_DATA_SPAN])
    write_file(args.report_file, report)
    out.json({"report": args.report_file, "request": args.request_file, "vmpl": vmpl,
              "backend": device.name, "size": len(report), "platform": platform})
    out.result(f"wrote {args.report_file} ({len(report)} bytes, VMPL {vmpl}, "
               f"{device.name} backend)" + (f"; its REPORT_DATA to {args.request_file}"
                                             if platform else ""))
    return EXIT_OK


def cmd_certificates(args: argparse.Namespace, out: Output) -> int:
    # lazy: certs dirs (pathlib, snpd.trust) only for the commands that use one
    from snpd.certsdir import write_certs_dir
    from snpd.device.base import ReportRequest
    from snpd.trust.certset import CertificateSet

    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise OutputFileError(f"certs dir {args.dir} exists and is not a directory")
    if _direct(args):
        device = _device(args)
        try:
            extended = device.extended_report(ReportRequest(os.urandom(64),
                                                            _default_vmpl(args, device)))
        finally:
            device.close()
        certs = CertificateSet.from_table(extended.certificates)
        entries = len(extended.certificates)
    else:
        with _client(args) as client:
            _, pairs = client.get_extended_report(os.urandom(64), args.vmpl)
        certs = CertificateSet.from_kinds(pairs)
        entries = len(pairs)
        for defect in certs.defects:  # dropped, not written: say so
            out.warn(f"left out of {args.dir}: {defect}")
    if not any(True for _ in certs.items()):
        out.json({"written": [], "entries": 0})
        out.result("the host provided no certificates (an empty table, as upstream KVM "
                   "gives); use 'snpctl fetch ca' and 'snpctl fetch vcek'")
        return EXIT_OK
    paths = write_certs_dir(args.dir, certs, args.encoding)
    out.json({"written": [str(p) for p in paths], "entries": entries})
    out.result(f"wrote {', '.join(str(p) for p in paths)}")
    return EXIT_OK


_DIGITS = {16: "0123456789abcdefABCDEF", 2: "01", 10: "0123456789"}


def _int(text: str) -> int:
    """Integers exactly as snpguest's ``parse_int_auto_radix`` reads them: ``0x`` hex,
    ``0b`` binary, else decimal (so ``010`` is ten), an optional ``+``, and nothing
    Python's ``int`` would also take (``0X``, ``0o``, ``_``, spaces)."""
    base, digits = ((16, text[2:]) if text.startswith("0x") else
                    (2, text[2:]) if text.startswith("0b") else (10, text))
    body = digits[1:] if digits.startswith("+") else digits
    if not body or any(c not in _DIGITS[base] for c in body):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer (decimal, 0x hex or 0b binary)")
    return int(body, base)


def cmd_key(args: argparse.Namespace, out: Output) -> int:
    # lazy: snpd.abi imports dataclasses and typing (25 ms budget)
    from snpd.abi.uapi import DerivedKeyRequest, RootKey

    if args.launch_mit_vector is not None:
        raise UsageError(
            "-l/--launch_mit_vector needs MSG_KEY_REQ version 2, and Linux's sev-guest "
            "ioctl passes only the 32-byte version-1 request, so the firmware would never "
            "see it; omit -l (the key then mixes in no launch mitigation vector)")
    check_output(args.key_file, "key file")
    device = _device(args) if _direct(args) else _DaemonDevice(args)
    try:
        vmpl = _default_vmpl(args, device)
        request: Any = DerivedKeyRequest(RootKey(args.root_key), args.guest_field_select,
                                    0 if vmpl is None else vmpl, args.guest_svn,
                                    args.tcb_version)
        if vmpl is None:
            request = _GuestVmpl(request)
        key = device.derived_key(request)
    finally:
        device.close()
    write_file(args.key_file, key, mode=0o600)
    out.json({"key_file": args.key_file, "root_key": args.root_key, "vmpl": vmpl,
              "via": device.name,
              "guest_field_select": args.guest_field_select, "fields": list(request.fields)})
    out.result(f"wrote {args.key_file} (32-byte {args.root_key.upper()}-rooted key, "
               f"fields {', '.join(request.fields) or 'none'})")
    return EXIT_OK


def _daemon_properties(args: argparse.Namespace) -> Dict[str, Any]:
    """The daemon's properties by interface, plus the ``transport`` that answered."""
    with _client(args) as client:
        props: Dict[str, Any] = client.properties()
        props["transport"] = client.transport
    return props


def render_status(props: Dict[str, Any], out: Output, *, source: str = "daemon") -> int:
    """``snpctl status`` from the daemon's properties (or the same dictionary built
    from local facts, ``source="local"``): with --json the status document
    (snpd.status.summary.DOCUMENT_KEYS), else one fact per line and the outcome.
    Exit 0 when the firmware channel is ready. Shared with main()'s fast path:
    it imports only snpd.status.summary, which is standard library only."""
    # lazy: only status renders; snpd.status.summary is standard library only
    from snpd.status.summary import status_document, status_lines

    doc = status_document(props, source=source)
    out.json(doc)
    for line in status_lines(doc):
        out.line(line)
    state = doc["state"] or "unknown"
    ok = state == "ready"
    if source == "daemon":
        out.result(f"{'OK' if ok else 'NOT READY'}: snpd {state} (via {doc['transport']})")
    else:
        out.result(f"{'OK' if ok else 'NOT READY'}: firmware channel {state} "
                   f"({doc['backend'] or 'no'} backend, direct)")
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _local_properties(args: argparse.Namespace) -> Dict[str, Any]:
    """What the daemon's properties would say, established by this process (status
    --direct): the local probe, the backend's own description, and one report (zero
    report data, the guest's VMPL) for the product and reported TCB, as the daemon
    asks for one at start. A backend that cannot be opened, or a report that fails,
    is the state "failed" with the reason, not an error."""
    # lazy: the probe and the device layer only for status --direct
    from snpd.device.base import ReportRequest
    from snpd.status.probe import emulated, probe, status_properties
    from snpd.status.summary import ATTESTATION, MANAGER

    status = probe()
    product: Optional[Product] = None
    source, tcb, vmpl = "", 0, status.vmpl or 0
    state, reason, backend = "ready", "", "none"
    binding: Optional[str] = None  # what REPORT_DATA binds, once a backend opened
    described: Optional[Dict[str, object]] = None
    try:
        device = _device(args)
    except SnpdError as exc:
        state, reason = "failed", str(exc)
    else:
        try:
            backend, described = device.name, device.describe()
            platform = device.platform()
            binding = platform.report_data
            if platform.emulated and platform.guest_vmpl is not None:
                status = emulated(platform.guest_vmpl, list(platform.driver_log),
                                  device_node=platform.device_node)
                vmpl, product, source = platform.guest_vmpl, platform.product, "emulator"
            elif status.cpu is not None and status.cpu.product is not None:
                product, source = status.cpu.product, "cpuid"
            try:
                # lazy: snpd.abi imports dataclasses and typing (25 ms budget)
                from snpd.abi.report import AttestationReport

                parsed = AttestationReport.from_bytes(device.report(ReportRequest(vmpl=vmpl)))
                tcb = parsed.reported_tcb
                if parsed.cpuid_product is not None:
                    product, source = parsed.cpuid_product, "report"
            except SnpdError as exc:
                state, reason = "failed", f"a report request failed: {exc}"
        finally:
            device.close()
    sev = status_properties(status)
    if product is not None:
        sev["product_source"] = source
    attestation: Dict[str, object] = {
        "Backend": backend, "Product": product.value if product else "", "Vmpl": vmpl,
        "ReportedTcb": tcb, "State": state, "StateReason": reason}
    if binding is not None:
        attestation["ReportDataBinding"] = binding
    return {ATTESTATION: attestation,
            MANAGER: {"Version": __version__, "SevStatus": sev, "Statistics": {}},
            "device": described}


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    """The SEV status and the daemon's state; with --direct (or --backend,
    --emulator-dir) this machine's, without asking the daemon."""
    if _direct(args):
        return render_status(_local_properties(args), out, source="local")
    return render_status(_daemon_properties(args), out)


def cmd_cache(args: argparse.Namespace, out: Output) -> int:
    """The daemon's verified certificate cache: its counters, or a refresh now (root)."""
    with _client(args) as client:
        if args.action == "refresh":
            client.refresh_certificates()
            out.json({"refreshed": True, "transport": client.transport})
            out.result("refreshed: this platform's chain and CRL were fetched, verified and "
                       "cached")
            return EXIT_OK
        stats = client.properties().get("org.snpd.Snpd1.Manager", {}).get("Statistics", {})
    kds = {k[len("kds."):]: int(v) for k, v in sorted(stats.items()) if k.startswith("kds.")}
    out.json({"kds": kds})
    if not kds:
        out.result("the daemon has no certificate cache configured")
        return EXIT_OK
    for name, value in kds.items():
        out.line(f"  {name.replace('_', ' '):16} {value}")
    out.result(f"cache: {kds.get('hits', 0) + kds.get('offline_hits', 0)} hits, "
               f"{kds.get('fetches', 0)} KDS fetches, {kds.get('rejected', 0)} answers "
               "rejected since snpd started")
    return EXIT_OK


def cmd_evidence(args: argparse.Namespace, out: Output) -> int:
    if args.nonce_file:
        nonce = read_file(args.nonce_file, "nonce file", limit=64)
    else:
        nonce = os.urandom(32)
    if _direct(args):
        media_type, evidence = _direct_evidence(args, out, nonce)
    else:
        with _client(args) as client:
            media_type, evidence = client.get_evidence(args.format, nonce)
    write_file(args.file, evidence)
    out.json({"file": args.file, "format": args.format, "media_type": media_type,
              "size": len(evidence)})
    out.result(f"wrote {args.file} ({len(evidence)} bytes, {media_type})")
    return EXIT_OK


def _direct_evidence(args: argparse.Namespace, out: Output, nonce: bytes) -> Any:
    """GetEvidence without the daemon: an extended report at the guest's own VMPL
    binding ``nonce``, with the endorsement key (VCEK or VLEK) from the host's table
    when that table verifies against the trusted roots (AMD's; with the emulator
    backend its own ARK too, as the daemon does). Without a verified table the
    evidence carries no certificate and the verifier fetches it."""
    # lazy: --direct evidence only; snpd.trust imports cryptography
    from snpd.abi.report import AttestationReport
    from snpd.device.base import ReportRequest
    from snpd.evidence import TRUSTEE_MEDIA_TYPE, trustee_evidence
    from snpd.trust.certset import CertificateSet
    from snpd.trust.roots import AMD_ROOTS
    from snpd.trust.verify import Verifier

    device = _device(args)
    try:
        # The guest's own VMPL, as the daemon's GetEvidence uses (no --vmpl here).
        vmpl = _default_vmpl(argparse.Namespace(vmpl=None), device)
        extended = device.extended_report(ReportRequest(nonce, vmpl))
        extra = device.platform().extra_roots  # the emulator's ARK, with its backend only
        roots = AMD_ROOTS.with_explicit(*extra) if extra else AMD_ROOTS
    finally:
        device.close()
    report = AttestationReport.from_bytes(extended.report)
    product = report.cpuid_product
    if product is None:
        raise NotSupported("Trustee evidence needs a v3+ report naming its CPU; this "
                           f"firmware produced version {report.version}")
    leaf: List[Any] = []
    if extended.certificates:
        try:
            certs = CertificateSet.from_table(extended.certificates)
            verdict = Verifier(roots).verify(report, certs, product=product)
        except CertificateFormatError as exc:
            out.warn(f"the host's certificate table is unusable ({exc}); the evidence "
                     "carries no certificate")
        else:
            if verdict.valid:
                leaf = [(kind, item.der) for kind, item in certs.items()
                        if kind in ("vcek", "vlek")]
            else:
                out.warn("the host's certificates did not verify ("
                         + ", ".join(c.name for c in verdict.failures)
                         + "); the evidence carries no certificate")
    return TRUSTEE_MEDIA_TYPE, trustee_evidence(report, product, leaf)


# -- kbs: secrets from a Trustee KBS -----------------------------------------------------------


class _DirectAttester:
    """--direct: evidence from the firmware in this process, as GetEvidence --direct
    makes it (the KBS protocol's ``snp`` TEE)."""

    tee = "snp"

    def __init__(self, args: argparse.Namespace, out: Output) -> None:
        self._args, self._out = args, out

    def evidence(self, binding: bytes) -> object:
        import json  # lazy: snpctl's fast path imports no more than it needs

        _, evidence = _direct_evidence(self._args, self._out, binding)
        return json.loads(evidence)


def _direct_kbs(args: argparse.Namespace) -> Any:
    """The KBS ``args.name`` of the configuration file, and a client for it: the daemon's
    own client, run in this process (root; the allow rules are the daemon's)."""
    # lazy: --direct kbs only (snpd.config imports most of snpd)
    from snpd.config import load_config
    from snpd.kbs.client import KbsClient

    if (args.backend or "") == "azure":
        raise NotSupported("snpctl kbs --direct has no Azure vTPM attester; ask the daemon")
    cfg = load_config(_path(args.config) if args.config else None)
    endpoint = cfg.kbs.get(args.name)
    if endpoint is None:
        known = ", ".join(sorted(cfg.kbs)) or "none"
        raise UsageError(f"no [kbs.{args.name}] in the configuration (configured: {known})")
    return KbsClient(endpoint.name, endpoint.url, ca_cert=endpoint.ca_cert,
                     tee_key=endpoint.tee_key, timeout=endpoint.timeout_s)


def cmd_kbs_resource(args: argparse.Namespace, out: Output) -> int:
    check_output(args.outfile, "resource file")
    if _direct(args):
        client = _direct_kbs(args)
        try:
            data = client.resource(args.path, _DirectAttester(args, out))
        finally:
            client.close()
        via = "direct"
    else:
        with _client(args) as daemon:
            data = daemon.get_resource(args.name, args.path)
            via = f"daemon ({daemon.transport})"
    # A secret: readable by its owner only, and never printed.
    write_file(args.outfile, data, mode=0o600)
    out.json({"file": args.outfile, "kbs": args.name, "path": args.path, "size": len(data),
              "via": via})
    out.result(f"wrote {args.outfile} ({len(data)} bytes of {args.path} from KBS "
               f"{args.name})")
    return EXIT_OK


def cmd_kbs_token(args: argparse.Namespace, out: Output) -> int:
    if _direct(args):
        client = _direct_kbs(args)
        try:
            token = client.token(_DirectAttester(args, out))
        finally:
            client.close()
    else:
        with _client(args) as daemon:
            token = daemon.get_token(args.name)
    out.json({"kbs": args.name, "token": token})
    out.result(token)
    return EXIT_OK


def cmd_ok(args: argparse.Namespace, out: Output) -> int:
    """Is SEV-SNP active and the guest interface usable? The daemon's facts when one
    answers (its privileged probe read the kernel log); else, or with --direct, what
    this process can read itself, as snpguest ``ok`` does, naming every source it
    could not read and why. Exit 0 when SEV-SNP is active (and, through the daemon,
    its firmware channel ready), 1 otherwise."""
    if (args.backend or ("emulator" if args.emulator_dir else "")) == "emulator":
        return _ok_emulator(args, out)
    daemon_error = None
    if not _direct(args):
        try:
            props = _daemon_properties(args)
        except SnpdError as exc:  # no daemon, or not ours to ask: look locally instead
            daemon_error = str(exc)
        else:
            return _ok_daemon(props, out)
    return _ok_local(args, out, daemon_error)


def _ok_daemon(props: Dict[str, Any], out: Output) -> int:
    from snpd.status.checks import daemon_checks, render  # lazy: snpctl ok's only
    from snpd.status.summary import status_document

    doc = status_document(props)
    rows = daemon_checks(doc)
    ok = bool(doc["snp_active"]) and doc["state"] == "ready"
    out.json({"snp_active": doc["snp_active"], "source": "daemon",
              "checks": [r.to_json() for r in rows], "status": doc})
    for line in render(rows):
        out.line(line)
    out.result(f"{'OK' if ok else 'FAIL'}: SEV-SNP {'active' if ok else 'not usable'} "
               f"(daemon via {props['transport']})")
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _ok_local(args: argparse.Namespace, out: Output, daemon_error: Optional[str]) -> int:
    from snpd.status.checks import local_checks, render  # lazy: snpctl ok's only
    from snpd.status.probe import DEVICE, probe

    root = _path(args.root)
    status = probe(root, msr=True)
    access = os.access(root / DEVICE, os.R_OK | os.W_OK) if status.device_node else None
    rows = local_checks(status, device_access=access, daemon_error=daemon_error)
    out.json({**status.to_json(), "source": "local", "daemon_error": daemon_error,
              "checks": [r.to_json() for r in rows]})
    for line in render(rows):
        out.line(line)
    if status.snp_active:
        out.result("OK: SEV-SNP is active")
        return EXIT_OK
    out.result("FAIL: SEV-SNP is not active" if status.snp_active is False else
               "UNKNOWN: nothing this user may read says whether SEV-SNP is active (run as "
               "root, or ask the daemon)")
    return EXIT_CHECK_FAILED


def _ok_emulator(args: argparse.Namespace, out: Output) -> int:
    """``ok --backend emulator``: the emulated guest stands in for hardware."""
    device = _device(args)
    try:
        facts = device.describe()
        platform = device.platform()
        doc = {"snp_active": True, "backend": "emulator", "product": str(platform.product),
               "vmpl": platform.guest_vmpl, "device": facts, "unavailable": []}
    finally:
        device.close()
    out.json(doc)
    out.line("  PASS  SEV-SNP            emulated (no hardware)")
    out.line(f"  PASS  product            {doc['product']}")
    out.line(f"  PASS  VMPL               {doc['vmpl']}")
    out.result("OK: SEV-SNP emulator ready")
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------


def _columns() -> int:
    """shutil.get_terminal_size without shutil: $COLUMNS, the terminal, else 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    stdout = sys.__stdout__
    try:
        return os.get_terminal_size(stdout.fileno()).columns if stdout else 80
    except (AttributeError, ValueError, OSError):
        return 80


_PARSER_CLASS: List[type] = []


def _Parser(*args: Any, **kwargs: Any) -> argparse.ArgumentParser:
    """An ArgumentParser of snpctl's class. The class (and its help formatter) is made
    on the first call: it subclasses argparse's, and argparse is imported only when
    used (see _Argparse)."""
    if not _PARSER_CLASS:
        class _HelpFormatter(argparse.HelpFormatter):
            """argparse makes a formatter for every add_argument, and the default one
            imports shutil (which imports bz2, lzma and fnmatch) for the terminal width:
            a few ms of every snpctl start, for help text that is rarely printed."""

            def __init__(self, prog: str, indent_increment: int = 2,
                         max_help_position: int = 24, width: Optional[int] = None) -> None:
                super().__init__(prog, indent_increment, max_help_position,
                                 _columns() - 2 if width is None else width)

        class Parser(argparse.ArgumentParser):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("formatter_class", _HelpFormatter)
                super().__init__(*args, **kwargs)

        _PARSER_CLASS.append(Parser)
    parser: argparse.ArgumentParser = _PARSER_CLASS[0](*args, **kwargs)
    return parser


FIRMWARE_DEFAULTS: Dict[str, Any] = {
    "direct": False, "backend": None, "socket": None, "bus": None, "emulator_dir": None,
    "device": "/dev/sev-guest", "configfs_root": "/sys/kernel/config/tsm/report"}
ENCODINGS = ("pem", "der")
ENDORSERS = ("vcek", "vlek")


def build_parser() -> argparse.ArgumentParser:
    # lazy: status and report parse without this parser (snpd.cli.fastpath), 25 ms budget
    from snpd.cli import generate
    from snpd.device import BACKENDS  # a tuple: snpd/device/__init__.py imports nothing

    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document instead of text")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print only the outcome")

    parser = _Parser(
        prog="snpctl", parents=[common],
        description="SEV-SNP attestation: reports, AMD certificates, verification.",
        epilog="Exit codes: 0 success, 1 a check failed, 2 usage or unreadable input, "
               "3 daemon, device or KDS unavailable.")
    parser.add_argument("--version", action="version", version=f"snpctl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(parent: Any, name: str, func: Callable[[argparse.Namespace, Output], int],
            help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_text,
                                                       description=help_text)
        p.set_defaults(func=func)
        return p

    def group(name: str, help_text: str) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        g = p.add_subparsers(dest="subcommand", metavar="WHAT")
        g.required = True
        return g

    def kds_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kds-url", default=os.environ.get(KDS_URL_ENV) or
                       "https://kdsintf.amd.com", metavar="URL",
                       help=f"KDS base URL (default: ${KDS_URL_ENV}, else AMD's)")
        p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="overall deadline for the KDS, retries included (default 60)")

    def trust_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--trust-root", action="append", default=[], metavar="FILE",
                       help="also trust this root certificate (PEM or DER) for this command")

    def firmware_options(p: argparse.ArgumentParser, **defaults: Any) -> None:
        """Where the firmware is reached. The same options stand before the command
        (``snpctl --direct report …``, the form the no-daemon hint prints) or after
        it: after it, they are SUPPRESSed, so the value given before stays unless
        overridden."""
        def value(name: str) -> Any:
            return defaults[name] if defaults else argparse.SUPPRESS

        p.add_argument("--direct", action="store_true", default=value("direct"),
                       help="open the firmware channel yourself instead of asking the "
                            "daemon (root)")
        p.add_argument("--backend", choices=BACKENDS,
                       default=value("backend"),
                       help="firmware backend for --direct (implies --direct)")
        p.add_argument("--socket", metavar="PATH", default=value("socket"),
                       help="the daemon's varlink socket (default /run/snpd/snpd.varlink)")
        p.add_argument("--bus", metavar="ADDRESS", default=value("bus"),
                       help="talk to the daemon over D-Bus ('system' or an address)")
        p.add_argument("--emulator-dir", metavar="DIR", default=value("emulator_dir"),
                       help="emulator state directory (keys, chain, chip ID)")
        p.add_argument("--device", metavar="PATH", default=value("device"),
                       help="the sev-guest device for --direct (default /dev/sev-guest)")
        p.add_argument("--configfs-root", metavar="DIR", default=value("configfs_root"),
                       help="configfs-tsm report directory for --direct (default "
                            "/sys/kernel/config/tsm/report)")

    firmware_options(parser, **FIRMWARE_DEFAULTS)
    firmware = _Parser(add_help=False)
    firmware_options(firmware)

    def add_fw(name: str, func: Callable[[argparse.Namespace, Output], int],
               help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, parents=[common, firmware],
                                                    help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add_fw("report", cmd_report, "get an attestation report from the firmware")
    p.add_argument("report_file", metavar="REPORT_FILE", help="where to write the 1184 bytes")
    p.add_argument("request_file", metavar="REQUEST_FILE",
                   help="up to 64 bytes of report data (written to with --random)")
    p.add_argument("-r", "--random", action="store_true",
                   help="generate random report data and write it to REQUEST_FILE")
    p.add_argument("-v", "--vmpl", type=int, choices=range(4), metavar="0-3",
                   help="VMPL to request (default: the guest's own; snpguest's is 1)")
    p.add_argument("-p", "--platform", action="store_true",
                   help="Azure confidential VMs (the azure backend): REQUEST_FILE's bytes "
                        "(none when it is absent) go to the paravisor as the runtime "
                        "data's user-data, and REQUEST_FILE is then overwritten with the "
                        "report's REPORT_DATA (SHA-256 of that runtime data), as snpguest "
                        "does; conflicts with --random")
    p = add_fw("certificates", cmd_certificates,
               "write the host's certificates (ark, ask or asvk, vcek or vlek, crl)")
    p.add_argument("encoding", type=choice(*ENCODINGS), choices=ENCODINGS)
    p.add_argument("dir")
    p.add_argument("-v", "--vmpl", type=int, choices=range(4), metavar="0-3")
    p = add_fw("key", cmd_key, "derive a key from the firmware")
    p.add_argument("key_file", metavar="KEY_FILE")
    p.add_argument("root_key", type=choice("vcek", "vmrk"), choices=("vcek", "vmrk"))
    p.add_argument("-v", "--vmpl", type=int, choices=range(4), metavar="0-3")
    # snpguest spells the long options with underscores; the dashed ones stay.
    p.add_argument("-g", "--guest-field-select", "--guest_field_select", type=_int,
                   default=0, metavar="BITS", dest="guest_field_select",
                   help="bits 0-5: policy, image_id, family_id, measurement, guest_svn, "
                        "tcb_version (decimal, 0x hex or 0b binary)")
    p.add_argument("-s", "--guest-svn", "--guest_svn", type=_int, default=0, metavar="N",
                   dest="guest_svn")
    p.add_argument("-t", "--tcb-version", "--tcb_version", type=_int, default=0,
                   metavar="N", dest="tcb_version")
    p.add_argument("-l", "--launch-mit-vector", "--launch_mit_vector", type=_int,
                   metavar="N", dest="launch_mit_vector",
                   help="refused: Linux cannot pass it to the firmware (MSG_KEY_REQ v2)")
    p = add_fw("status", cmd_status, "show the SEV status (features, VMPL, VMPCK, product, "
               "reported TCB) and the daemon's state; --direct: this machine's, no daemon")
    p = add_fw("evidence", cmd_evidence, "get attestation evidence for a fleet verifier")
    p.add_argument("file", help="where to write the evidence")
    p.add_argument("--format", default="trustee", choices=("trustee",))
    p.add_argument("--nonce-file", metavar="FILE",
                   help="up to 64 bytes to bind (default: 32 random bytes)")
    kbs = group("kbs", "secrets from a Trustee Key Broker Service configured as [kbs.NAME]")

    def add_kbs(name: str, func: Callable[[argparse.Namespace, Output], int],
                help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = kbs.add_parser(name, parents=[common, firmware],
                                                    help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("name", metavar="NAME", help="the KBS, as named in [kbs.NAME]")
        p.add_argument("--config", metavar="FILE",
                       help="with --direct: the configuration naming the KBS (default "
                            "/etc/snpd/snpd.toml)")
        return p

    p = add_kbs("get-resource", cmd_kbs_resource,
                "fetch a resource from the KBS through the daemon (or --direct, root), "
                "decrypted, into OUTFILE (mode 0600)")
    p.add_argument("path", metavar="REPOSITORY/TYPE/TAG")
    p.add_argument("outfile", metavar="OUTFILE")
    add_kbs("token", cmd_kbs_token, "print the KBS's attestation token for the daemon's "
            "session (a bearer credential)")
    p = add(sub, "cache", cmd_cache, "show the daemon's certificate cache counters, or "
            "refresh this platform's chain and CRL now (root)")
    p.add_argument("action", nargs="?", choices=("show", "refresh"), default="show")
    p.add_argument("--socket", metavar="PATH",
                   help="the daemon's varlink socket (default /run/snpd/snpd.varlink)")
    p.add_argument("--bus", metavar="ADDRESS",
                   help="talk to the daemon over D-Bus ('system' or an address)")
    p = add_fw("ok", cmd_ok, "check that SEV-SNP is active and the guest interface usable "
               "(through the daemon, else from what this user can read)")
    p.add_argument("--root", default="/", help=argparse.SUPPRESS)

    generate.add_parsers(sub, common)
    display = group("display", "show a report or a key")
    p = add(display, "report", cmd_display_report, "decode and show an attestation report")
    p.add_argument("file", help="the 1184-byte report")
    p.add_argument("-p", "--processor-model", "--product", dest="product",
                   type=choice(*PROCESSOR_MODELS), choices=PROCESSOR_MODELS,
                   help="decode TCBs with this product's layout (v2 reports carry no CPUID)")
    p = add(display, "key", cmd_display_key, "show a derived key as hex")
    p.add_argument("file")

    fetch = group("fetch", "fetch certificates from AMD's KDS")
    for what, func, text in (("ca", cmd_fetch_ca, "the ARK and ASK (or ASVK) of a product"),
                             ("crl", cmd_fetch_crl, "the ARK-signed CRL of a product")):
        p = add(fetch, what, func, f"fetch {text}")
        p.add_argument("encoding", type=choice(*ENCODINGS), choices=ENCODINGS)
        p.add_argument("dir", help="certs dir to write into")
        p.add_argument("product", nargs="?", type=choice(*PROCESSOR_MODELS),
                       choices=PROCESSOR_MODELS, help="processor model")
        p.add_argument("-r", "--report", help="take the product from this report (v3+)")
        p.add_argument("-e", "--endorser", type=choice(*ENDORSERS), choices=ENDORSERS,
                       default="vcek")
        kds_options(p)
        trust_option(p)
    p = add(fetch, "vcek", cmd_fetch_vcek, "fetch the VCEK that signs a report")
    p.add_argument("encoding", type=choice(*ENCODINGS), choices=ENCODINGS)
    p.add_argument("dir", help="certs dir to write into")
    p.add_argument("report_file", metavar="report", help="the attestation report")
    p.add_argument("-p", "--processor-model", "--product", dest="product",
                   type=choice(*PROCESSOR_MODELS), choices=PROCESSOR_MODELS,
                   help="for v2 reports, which carry no CPUID")
    kds_options(p)

    verify = group("verify", "verify a certificate chain or an attestation report")
    p = add(verify, "certs", cmd_verify_certs, "verify the chain in a certs dir")
    p.add_argument("dir")
    p.add_argument("--at", type=parse_time, metavar="TIME",
                   help="check validity at this RFC 3339 time (default now)")
    trust_option(p)
    p = add(verify, "attestation", cmd_verify_attestation,
            "verify a report and its certificate chain (the chain is always checked)")
    p.add_argument("dir", help="certs dir: ark, ask or asvk, vcek or vlek, optional crl")
    p.add_argument("report", help="the 1184-byte report")
    p.add_argument("--at", type=parse_time, metavar="TIME",
                   help="check validity at this RFC 3339 time (default now)")
    p.add_argument("--policy", metavar="FILE", help="appraisal policy (TOML)")
    p.add_argument("-p", "--processor-model", "--processor_model", "--product", dest="product",
                   type=choice(*PROCESSOR_MODELS), choices=PROCESSOR_MODELS, metavar="MODEL",
                   help="expected processor model, any case (Bergamo and Siena are Genoa); "
                        "it must agree with the report and the chain")
    only = p.add_mutually_exclusive_group()
    only.add_argument("-t", "--tcb", action="store_true",
                      help="check the TCB and chip ID binding, not the signature (the chain "
                           "is still checked; the result is partial, never VALID)")
    only.add_argument("-s", "--signature", action="store_true",
                      help="check the signature, not the TCB and chip ID binding (the chain "
                           "is still checked; the result is partial, never VALID)")
    for short, name, size in (("-m", "--measurement", 48), ("-d", "--host-data", 32),
                              ("-r", "--report-data", 64), ("", "--id-key-digest", 48),
                              ("", "--author-key-digest", 48)):
        p.add_argument(*filter(None, (short, name)), metavar="VALUE",
                       help=f"expected {name[2:].replace('-', '_')}: 0x and {2 * size} hex "
                            f"digits (or the digits alone), or exactly {size} characters "
                            "(as in snpguest); a mismatch fails the verdict")
    trust_option(p)
    p = add(verify, "evidence", cmd_verify_evidence,
            "verify Azure vTPM evidence (Trustee's az-snp-vtpm) for a nonce")
    p.add_argument("dir", help="certs dir: at least ark and ask; the evidence's VCEK is used "
                               "when the dir has none")
    p.add_argument("evidence", help="the evidence JSON (az-snp-vtpm v0, v1 or v2)")
    p.add_argument("--nonce-file", required=True, metavar="FILE",
                   help="the nonce the quote must carry, as raw bytes")
    p.add_argument("--at", type=parse_time, metavar="TIME",
                   help="check validity at this RFC 3339 time (default now)")
    p.add_argument("--policy", metavar="FILE",
                   help="appraisal policy (TOML); its [pcrs] and [vm_configuration] tables "
                        "judge the quote and the runtime data")
    p.add_argument("-p", "--processor-model", "--product", dest="product",
                   type=choice(*PROCESSOR_MODELS), choices=PROCESSOR_MODELS, metavar="MODEL",
                   help="expected processor model (v2 reports do not name it)")
    trust_option(p)
    return parser


def _version() -> str:
    return __version__


def _parse(argv: Optional[Sequence[str]], stdout: TextIO, stderr: TextIO) -> Any:
    """The command line's namespace, or the exit status argparse chose (2 for a usage
    error, 0 after --help). A plain status or report command line is read by
    snpd.cli.fastpath, which gives the same namespace without importing argparse or
    building the parser (most of these commands' start-up time); anything else,
    and every help text and error, is argparse's."""
    args: Any = fastpath.parse(sys.argv[1:] if argv is None else argv)
    if args is not None:
        args.func = {"status": cmd_status, "report": cmd_report}[args.command]
        return args
    import contextlib  # lazy: argparse's path only; the fast path runs without contextlib

    parser = build_parser()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)


def main(argv: Optional[Sequence[str]] = None, *, stdout: TextIO = sys.stdout,
         stderr: TextIO = sys.stderr) -> int:
    args = _parse(argv, stdout, stderr)
    if isinstance(args, int):
        return args
    out = Output(getattr(args, "json", False), getattr(args, "quiet", False), stdout, stderr)
    try:
        result: int = args.func(args, out)
        return result
    except SnpdError as exc:
        out.warn(str(exc))
        out.json({"error": type(exc).__name__, "kind": exc.kind, "message": str(exc)})
        if isinstance(exc, ReportFormatError):
            return EXIT_CHECK_FAILED
        return exc.exit_code
    except ValueError as exc:  # e.g. Product.parse on a name argparse let through
        out.warn(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (snpctl … | head): exit quietly, like any Unix filter.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
