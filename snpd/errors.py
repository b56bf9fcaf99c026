"""One error taxonomy from the device to the wire.

Every error snpd raises on purpose is a :class:`SnpdError`. Each class maps to one
D-Bus error name, one varlink error and one ``snpctl`` exit code, so a transport
never has to invent a mapping. Subclasses refine the message, never the mapping:
a :class:`ReportFormatError` travels as ``InvalidArgument`` everywhere.
"""

from __future__ import annotations

TYPE_CHECKING = False  # see snpd/__init__.py: the client path does not import typing
if TYPE_CHECKING:
    from typing import ClassVar, Optional

DBUS_PREFIX = "org.snpd.Snpd1.Error."

# snpctl exit codes (docs/contracts.md, "The command line"): 0 success, 1 a check failed, 2 usage or
# unreadable input, 3 daemon or device unavailable.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


class SnpdError(Exception):
    """Base of every deliberate snpd error."""

    kind: ClassVar[str] = "Internal"
    exit_code: ClassVar[int] = EXIT_UNAVAILABLE

    @classmethod
    def dbus_name(cls) -> str:
        return DBUS_PREFIX + cls.kind

    @classmethod
    def varlink_name(cls, interface: str) -> str:
        return f"{interface}.{cls.kind}"


class Internal(SnpdError):
    """A bug in snpd; the message says where."""


class InvalidArgument(SnpdError):
    """The caller's input is malformed or out of range."""

    kind = "InvalidArgument"
    exit_code = EXIT_USAGE


class ReportFormatError(InvalidArgument):
    """The bytes are not a well-formed SEV-SNP attestation report."""


class CertificateFormatError(InvalidArgument):
    """A certificate or CRL could not be decoded."""


class EvidenceFormatError(InvalidArgument):
    """Evidence around a report is malformed: an Azure HCL report, a TPM2 quote or
    signature, or an evidence document; the message names the field."""


class InputFileError(InvalidArgument):
    """A file the caller named is missing, unreadable or too large."""


class ConfigError(InvalidArgument):
    """A configuration or policy file is invalid; the message names the key."""


class CanonicalizationError(InvalidArgument):
    """A value has no RFC 8785 (JCS) canonical form: a non-string key, an integer beyond
    2**53, NaN or Infinity, a lone surrogate, or nesting too deep."""


class PermissionDenied(SnpdError):
    kind = "PermissionDenied"
    exit_code = EXIT_UNAVAILABLE


class Busy(SnpdError):
    """The queue is full or the host answered busy; retry later."""

    kind = "Busy"
    exit_code = EXIT_UNAVAILABLE


class ShuttingDown(Busy):
    """snpd is stopping and did not run the request; it travels as ``Busy`` because
    retrying against the next daemon instance is the right reaction."""


class KdsBudgetExceeded(Busy):
    """A caller used up its share of KDS work; the KDS was not contacted. ``limit``
    names the bound that was hit ("calls": KDS-bound calls in flight, "fetches":
    outbound fetches per time window); it travels as ``Busy``: retry later."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class Timeout(SnpdError):
    kind = "Timeout"
    exit_code = EXIT_UNAVAILABLE


class VmpckLost(SnpdError):
    """The kernel wiped the VMPCK answering this very request: no later firmware
    request can succeed. The device layer raises it where the errno proves the wipe,
    so the broker's health never guesses from a message or a base class. Never raised
    as such: each subclass keeps the wire kind its errno always had, so callers see
    the same D-Bus/varlink error and exit code as before the wipe was told apart."""

    errno: Optional[int] = None


class VmpckTimedOut(VmpckLost, Timeout):
    """ETIMEDOUT: the host kept the firmware busy past the kernel's 60 s retry window
    and the kernel wiped the VMPCK to prevent IV reuse. Travels as ``Timeout``; a
    plain :class:`Timeout` is a caller's deadline and leaves the key alone."""

    kind = "Timeout"
    errno = 110  # ETIMEDOUT on Linux, the only kernel with sev-guest


class DeviceUnavailable(SnpdError):
    """The firmware channel cannot be opened (missing node, permission)."""

    kind = "DeviceError"
    exit_code = EXIT_UNAVAILABLE


class DeviceError(SnpdError):
    """The firmware channel failed; carries errno, fw_error and vmm_error."""

    kind = "DeviceError"
    exit_code = EXIT_UNAVAILABLE

    def __init__(
        self,
        message: str,
        *,
        errno: Optional[int] = None,
        fw_error: Optional[int] = None,
        vmm_error: Optional[int] = None,
    ) -> None:
        details = []
        if errno is not None:
            details.append(f"errno={errno}")
        if fw_error is not None:
            details.append(f"fw_error=0x{fw_error:x}")
        if vmm_error is not None:
            details.append(f"vmm_error=0x{vmm_error:x}")
        super().__init__(f"{message} ({', '.join(details)})" if details else message)
        self.errno = errno
        self.fw_error = fw_error
        self.vmm_error = vmm_error


# TPM 2.0 warnings that mean "send the same command again" (Part 2, TPM_RC): RETRY,
# YIELDED, TESTING (self-test still running), NV_RATE (NV write rate limit).
_TPM_RC_RETRYABLE = (0x922, 0x908, 0x90A, 0x920)
_TPM_RC_HANDLE = 0x08B


class TpmError(DeviceError):
    """A TPM 2.0 command answered a response code other than TPM_RC_SUCCESS. ``rc`` is
    the raw code and ``command`` the command's name; the message, built by
    :func:`snpd.abi.tpm2_commands.tpm_error`, decodes the code for a human."""

    def __init__(self, message: str, *, rc: int, command: str = "") -> None:
        super().__init__(message)
        self.rc = rc
        self.command = command

    @property
    def code(self) -> int:
        """The code without a format-one error's parameter, handle or session number."""
        return 0x080 | (self.rc & 0x03F) if self.rc & 0x080 else self.rc

    @property
    def retryable(self) -> bool:
        """A warning after which the same command may succeed (TPM_RC_RETRY and kin)."""
        return self.rc in _TPM_RC_RETRYABLE

    @property
    def handle_missing(self) -> bool:
        """TPM_RC_HANDLE: a handle names nothing (an undefined NV index, an empty
        persistent handle)."""
        return self.code == _TPM_RC_HANDLE


class TpmCommandFormatError(InvalidArgument):
    """A TPM command's bytes are malformed (an emulator reading what a guest sent);
    the message names the field."""


class VmpckBadMessage(VmpckLost, DeviceError):
    """EBADMSG: a firmware response failed authentication and the kernel wiped the
    VMPCK. Travels as ``DeviceError`` and carries errno like any device error."""

    kind = "DeviceError"


class VmpckDisabled(SnpdError):
    """The kernel wiped the VMPCK; no firmware request can succeed until reboot."""

    kind = "VmpckDisabled"
    exit_code = EXIT_UNAVAILABLE


class NotSupported(SnpdError):
    kind = "NotSupported"
    exit_code = EXIT_UNAVAILABLE


class CertificatesUnavailable(SnpdError):
    """Certificates could not be had from the host, the cache or the KDS."""

    kind = "CertificatesUnavailable"
    exit_code = EXIT_UNAVAILABLE


class KdsError(CertificatesUnavailable):
    """The KDS answered with an error, a bad body, or not within the deadline.
    ``retry_after``: seconds the KDS asked to wait (429/503 Retry-After), if it did."""

    def __init__(self, message: str, *, url: str = "", status: Optional[int] = None,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.retry_after = retry_after


class CertTableError(CertificatesUnavailable):
    """The host's certificate table is malformed; the message names the entry, its
    offset and length, and the buffer size."""


class UntrustedCertificate(CertificatesUnavailable):
    """Certificates arrived but did not verify against the trusted roots."""


class KbsError(SnpdError):
    """A Trustee Key Broker Service refused, failed, or answered something snpd cannot
    use; ``status`` is the HTTP status when one was answered. Its own kind, because the
    reaction (check the KBS, its policy or the network) differs from every local failure."""

    kind = "KbsError"
    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, *, status: Optional[int] = None,
                 error_type: str = "") -> None:
        super().__init__(message)
        self.status = status
        # The name in Trustee's ErrorInformation ("PolicyDeny"), when the KBS sent one.
        self.error_type = error_type


class KbsProtocolError(KbsError):
    """A KBS message is malformed: not the JSON, JWT or JWE the protocol names, or out
    of bounds; the message names the field, never a secret."""


class SecretDecryptionError(KbsProtocolError):
    """A KBS resource (JWE) does not decrypt with the daemon's TEE key: a wrong key, a
    tampered header, key or ciphertext. Says nothing about which step failed."""


ALL_KINDS = (
    "InvalidArgument",
    "PermissionDenied",
    "Busy",
    "Timeout",
    "DeviceError",
    "VmpckDisabled",
    "NotSupported",
    "CertificatesUnavailable",
    "KbsError",
    "Internal",
)
