"""``snpctl generate``: snpguest's pre-attestation family, same command lines, same
files and same console output.

- ``id-block ID_KEY AUTHOR_KEY LAUNCH_DIGEST`` — the ID block and ID auth info,
  base64 (the form QEMU's ``id-block``/``id-auth`` options take);
- ``key-digest KEY`` — SHA-384 of the key in AMD's format, hex;
- ``measurement`` and ``ovmf-hash`` — the expected launch digest, through the
  optional sev-snp-measure package (``pip install 'snpd[measure]'``).

snpctl's start-up budget applies here too: build_parser imports this module for
every command, so it imports only the standard library; each command imports what it
needs when it runs.
"""

from __future__ import annotations

import argparse

from snpd.cli.common import Output, UsageError, check_output, choice, read_file, write_file
from snpd.errors import EXIT_OK

TYPE_CHECKING = False  # see snpd/__init__.py: the parser path does not import typing
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Optional, Tuple

OUTPUT_FORMATS = ("hex", "base64")


# -- integers, read as snpguest's clap parsers read them --------------------------------


def _digits(text: str, base: int, signed: bool) -> Optional[int]:
    """Rust's ``from_str_radix``: an optional sign (``-`` only when signed), then at
    least one digit; no spaces, underscores or prefixes."""
    sign, body = (text[0], text[1:]) if text[:1] in ("+", "-") else ("+", text)
    alphabet = "0123456789abcdefABCDEF"[:22 if base == 16 else 10]
    if (sign == "-" and not signed) or not body or any(c not in alphabet for c in body):
        return None
    value = int(body, base)
    return -value if sign == "-" else value


def _ranged(value: Optional[int], text: str, low: int, high: int, what: str) -> int:
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range ({low} to {high})")
    return value


def u32(text: str) -> int:
    """Decimal, as clap's default ``u32`` parser takes it."""
    return _ranged(_digits(text, 10, False), text, 0, (1 << 32) - 1, "a decimal integer")


def i32(text: str) -> int:
    """Decimal with an optional sign, as clap's default ``i32`` parser takes it."""
    return _ranged(_digits(text, 10, True), text, -(1 << 31), (1 << 31) - 1,
                   "a decimal integer")


def maybe_hex_u64(text: str) -> int:
    """clap-num's ``maybe_hex::<u64>``: ``0x`` or ``0X`` then hex, else decimal."""
    hexa = text[:2].lower() == "0x"
    value = _digits(text[2:], 16, False) if hexa else _digits(text, 10, False)
    return _ranged(value, text, 0, (1 << 64) - 1, "an integer (decimal or 0x hex)")


# -- commands --------------------------------------------------------------------------


def _check_outputs(*pairs: Tuple[Optional[str], str]) -> None:
    for name, what in pairs:
        if name is not None:
            check_output(name, what)


def cmd_id_block(args: argparse.Namespace, out: Output) -> int:
    # lazy: build_parser imports this module for every snpctl command (25 ms);
    # idblock imports cryptography
    import base64

    from snpd.abi import idblock

    digest = idblock.parse_launch_digest(args.launch_digest)
    family = (bytes(idblock.ID_SIZE) if args.family_id is None
              else idblock.parse_id(args.family_id, "family ID"))
    image = (bytes(idblock.ID_SIZE) if args.image_id is None
             else idblock.parse_id(args.image_id, "image ID"))
    if args.version is not None and args.version != idblock.ID_BLOCK_VERSION and not out.quiet:
        out.warn(f"-v/--version {args.version} ignored: ID block version "
                 f"{idblock.ID_BLOCK_VERSION} is the only one defined, and the one written "
                 "(snpguest ignores -v too)")
    block = idblock.IdBlock(
        launch_digest=digest, family_id=family, image_id=image,
        guest_svn=0 if args.svn is None else args.svn,
        policy=idblock.DEFAULT_POLICY if args.policy is None else args.policy)
    id_key = idblock.load_private_key(read_file(args.id_block_key, "ID key"),
                                      f"ID key {args.id_block_key}")
    author_key = idblock.load_private_key(read_file(args.auth_key, "author key"),
                                          f"author key {args.auth_key}")
    _check_outputs((args.id_file, "ID block file"), (args.auth_file, "auth block file"))
    result = idblock.generate(block, id_key, author_key)
    id_text = base64.b64encode(result.id_block.to_bytes()).decode()
    auth_text = base64.b64encode(result.id_auth.to_bytes()).decode()
    if args.id_file is not None:
        write_file(args.id_file, id_text.encode())
    if args.auth_file is not None:
        write_file(args.auth_file, auth_text.encode())
    out.json({"id_block": id_text, "auth_block": auth_text,
              "id_key_digest": result.id_key_digest.hex(),
              "author_key_digest": result.author_key_digest.hex(),
              "launch_digest": block.launch_digest.hex(), "family_id": block.family_id.hex(),
              "image_id": block.image_id.hex(), "version": block.version,
              "guest_svn": block.guest_svn, "policy": block.policy,
              "id_file": args.id_file, "auth_file": args.auth_file})
    for text in ("ID-BLOCK:", id_text, "AUTH-BLOCK:", auth_text):
        out.line(text)
    return EXIT_OK


def cmd_key_digest(args: argparse.Namespace, out: Output) -> int:
    from snpd.abi import idblock  # lazy: cryptography, not at snpctl's start (see cmd_id_block)

    key = idblock.load_private_key(read_file(args.key, "key"), f"key {args.key}")
    _check_outputs((args.key_digest_file, "key digest file"))
    text = idblock.key_digest(key.public_key()).hex()
    if args.key_digest_file is not None:
        write_file(args.key_digest_file, text.encode())
    out.json({"key_digest": text, "key_digest_file": args.key_digest_file})
    out.line("Key Digest:")
    out.line(text)
    return EXIT_OK


def _formatted(digest: bytes, output_format: str, prefix: str) -> str:
    """snpguest's forms: lower-case hex (``prefix`` before it), or base64 of that hex
    text (not of the digest: snpguest encodes ``get_hex_ld().as_bytes()``)."""
    import base64  # lazy: see cmd_id_block

    if output_format == "hex":
        return prefix + digest.hex()
    return base64.b64encode(digest.hex().encode()).decode()


def _vcpu_sig(args: argparse.Namespace) -> int:
    """One of snpguest's three mutually exclusive ways to name the vCPU."""
    from snpd import measurement  # lazy: dataclasses, typing; optional sev-snp-measure

    fms = {"--vcpu-family": args.vcpu_family, "--vcpu-model": args.vcpu_model,
           "--vcpu-stepping": args.vcpu_stepping}
    given = [name for name, value in fms.items() if value is not None]
    if args.vcpu_type is not None and (args.vcpu_sig is not None or given):
        other = "--vcpu-sig" if args.vcpu_sig is not None else given[0]
        raise UsageError(f"--vcpu-type cannot be used with {other}: name the vCPU one way")
    if args.vcpu_sig is not None and given:
        raise UsageError(f"--vcpu-sig cannot be used with {given[0]}: name the vCPU one way")
    if args.vcpu_type is not None:
        return measurement.vcpu_type_sig(args.vcpu_type)
    if args.vcpu_sig is not None:
        return measurement.checked_sig(args.vcpu_sig)
    if given:
        missing = [name for name, value in fms.items() if value is None]
        if missing:
            raise UsageError(f"{', '.join(given)} also needs {' and '.join(missing)}: family, "
                             "model and stepping go together")
        return measurement.checked_sig(measurement.cpu_sig(
            args.vcpu_family, args.vcpu_model, args.vcpu_stepping))
    raise UsageError("give the vCPU type: --vcpu-type, --vcpu-sig, or --vcpu-family with "
                     "--vcpu-model and --vcpu-stepping")


def cmd_measurement(args: argparse.Namespace, out: Output) -> int:
    from snpd import measurement  # lazy: dataclasses, typing; optional sev-snp-measure

    for option, value in (("--initrd", args.initrd), ("--append", args.append)):
        if value is not None and args.kernel is None:
            raise UsageError(f"{option} needs --kernel")
    inputs = measurement.MeasurementInputs(
        ovmf=args.ovmf, vcpu_sig=_vcpu_sig(args), vcpus=args.vcpus,
        vmm_type="QEMU" if args.vmm_type is None else measurement.vmm_type(args.vmm_type),
        kernel=args.kernel, initrd=args.initrd, append=args.append,
        guest_features=(measurement.DEFAULT_GUEST_FEATURES if args.guest_features is None
                        else args.guest_features),
        ovmf_hash=None if args.ovmf_hash is None else measurement.parse_ovmf_hash(args.ovmf_hash))
    measurement.library("generate measurement")  # missing: say so before touching files
    _check_outputs((args.measurement_file, "measurement file"))
    digest = measurement.launch_digest(inputs)
    text = _formatted(digest, args.output_format, "0x")
    if args.measurement_file is not None:
        write_file(args.measurement_file, text.encode())
    out.json({"measurement": digest.hex(), "output_format": args.output_format,
              "vcpus": inputs.vcpus, "vcpu_sig": inputs.vcpu_sig, "vmm_type": inputs.vmm_type,
              "guest_features": inputs.guest_features,
              "ovmf_hash": None if inputs.ovmf_hash is None else inputs.ovmf_hash.hex(),
              "measurement_file": args.measurement_file})
    out.line(text)
    return EXIT_OK


def cmd_ovmf_hash(args: argparse.Namespace, out: Output) -> int:
    from snpd import measurement  # lazy: dataclasses, typing; optional sev-snp-measure

    measurement.library("generate ovmf-hash")
    _check_outputs((args.hash_file, "hash file"))
    digest = measurement.ovmf_hash(args.ovmf)
    text = _formatted(digest, args.output_format, "")
    if args.hash_file is not None:
        write_file(args.hash_file, text.encode())
    out.json({"ovmf_hash": digest.hex(), "output_format": args.output_format,
              "hash_file": args.hash_file})
    out.line(text)
    return EXIT_OK


# -- parsers ---------------------------------------------------------------------------


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """``snpctl generate …`` under snpctl's top-level subparsers ``sub``; ``common``
    carries --json and -q (with -q nothing is printed, as with snpguest's --quiet)."""
    text = "pre-attestation values: ID block and auth info, key digests, measurements"
    group = sub.add_parser("generate", help=text, description=text)
    gen = group.add_subparsers(dest="subcommand", metavar="WHAT")
    gen.required = True

    def add(name: str, func: Callable[[argparse.Namespace, Output], int],
            help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = gen.add_parser(name, parents=[common], help=help_text,
                                                    description=help_text)
        p.set_defaults(func=func)
        return p

    formats: Dict[str, Any] = {
        "type": choice(*OUTPUT_FORMATS), "choices": OUTPUT_FORMATS, "default": "hex",
        "help": "hex (default) or base64 (of the hex text, as snpguest writes it)"}

    p = add("measurement", cmd_measurement,
            "calculate the expected launch measurement of an SEV-SNP guest "
            "(needs sev-snp-measure: pip install 'snpd[measure]')")
    p.add_argument("-v", "--vcpus", type=u32, default=1, metavar="N",
                   help="number of guest vCPUs (default 1)")
    p.add_argument("--vcpu-type", metavar="TYPE",
                   help="QEMU vCPU model: EPYC, EPYC-v1 … EPYC-v4, EPYC-IBPB, EPYC-Rome(-v1…v3), "
                        "EPYC-Milan(-v1, -v2), EPYC-Genoa(-v1)")
    p.add_argument("--vcpu-sig", type=i32, metavar="SIG",
                   help="vCPU signature (CPUID 1 EAX), decimal")
    p.add_argument("--vcpu-family", type=i32, metavar="N")
    p.add_argument("--vcpu-model", type=i32, metavar="N")
    p.add_argument("--vcpu-stepping", type=i32, metavar="N")
    p.add_argument("-t", "--vmm-type", metavar="TYPE", help="QEMU (default), ec2 or KRUN")
    p.add_argument("-o", "--ovmf", required=True, metavar="FILE", help="the OVMF firmware")
    p.add_argument("-k", "--kernel", metavar="FILE", help="the kernel, for measured direct boot")
    p.add_argument("-i", "--initrd", metavar="FILE", help="the initrd (with --kernel)")
    p.add_argument("-a", "--append", metavar="CMDLINE",
                   help="the kernel command line (with --kernel)")
    p.add_argument("-g", "--guest-features", type=maybe_hex_u64, metavar="BITS",
                   help="VMSA SEV_FEATURES, decimal or 0x hex (default 0x1)")
    p.add_argument("--ovmf-hash", metavar="HEX",
                   help="the OVMF hash from 'generate ovmf-hash', instead of hashing --ovmf "
                        "(whose metadata is still read)")
    p.add_argument("-f", "--output-format", **formats)
    p.add_argument("-m", "--measurement-file", metavar="FILE",
                   help="also write the measurement to FILE")

    p = add("ovmf-hash", cmd_ovmf_hash, "calculate the launch digest of an OVMF image alone "
            "(needs sev-snp-measure: pip install 'snpd[measure]')")
    p.add_argument("-o", "--ovmf", required=True, metavar="FILE", help="the OVMF firmware")
    p.add_argument("-f", "--output-format", **formats)
    p.add_argument("--hash-file", metavar="FILE", help="also write the hash to FILE")

    p = add("id-block", cmd_id_block,
            "generate an ID block and its auth info, signed with two EC P-384 keys")
    p.add_argument("id_block_key", metavar="ID_KEY", help="the ID key (PEM or DER)")
    p.add_argument("auth_key", metavar="AUTHOR_KEY", help="the author key (PEM or DER)")
    p.add_argument("launch_digest", metavar="LAUNCH_DIGEST",
                   help="the expected measurement: 0x and hex, or base64")
    p.add_argument("-f", "--family-id", metavar="HEX", help="16-byte family ID, 32 hex digits")
    p.add_argument("-m", "--image-id", metavar="HEX", help="16-byte image ID, 32 hex digits")
    p.add_argument("-v", "--version", type=u32, metavar="N",
                   help="ID block version: only 1 exists (ignored, as by snpguest)")
    p.add_argument("-s", "--svn", type=u32, metavar="N", help="guest SVN (default 0)")
    p.add_argument("-p", "--policy", type=maybe_hex_u64, metavar="POLICY",
                   help="guest policy, decimal or 0x hex (default 0x30000)")
    p.add_argument("-i", "--id-file", metavar="FILE", help="also write the ID block (base64)")
    p.add_argument("-a", "--auth-file", metavar="FILE",
                   help="also write the auth info (base64)")

    p = add("key-digest", cmd_key_digest,
            "SHA-384 digest of an EC P-384 key in AMD's format (ID_KEY_DIGEST, "
            "AUTHOR_KEY_DIGEST)")
    p.add_argument("key", metavar="KEY", help="the private key (PEM or DER)")
    p.add_argument("-d", "--key-digest-file", metavar="FILE",
                   help="also write the digest (hex)")
