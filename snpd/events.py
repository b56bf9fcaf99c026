"""Structured events for journald (one MESSAGE_ID per event type), or stderr.

The journal's native protocol is spoken directly over its datagram socket (a
few lines of stdlib), so the daemon needs no C extension and the tests can
bind the socket anywhere (``SNPD_JOURNAL_SOCKET`` names it). Never logged:
report_data, key bytes, full chip IDs (a short hash stands in for the chip).

Events a caller can repeat at will (refusals, failed requests, failed
verifications, failed KDS fetches) are coalesced per event type and key (the
caller's uid, say) by :class:`Repeats`: a burst goes out, then one per interval,
and the record after a quiet spell, or :meth:`Events.flush`, says "suppressed N
similar" (also in ``SNPD_SUPPRESSED=N``). Otherwise one user could fill the journal,
whose rate limit would then drop everything else snpd logs.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import socket
import struct
import sys
import threading
import time
from typing import (
    TYPE_CHECKING,
    Dict,
    Hashable,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    TextIO,
)

from snpd.abi.report import AttestationReport
from snpd.errors import Busy, DeviceError, Timeout, VmpckDisabled
from snpd.ratelimit import Clock, Rate, TokenBucket

if TYPE_CHECKING:
    from snpd.abi.product import Product
    from snpd.access import Caller

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Overrides JOURNAL_SOCKET: for tests and containers (see journal_socket_path).
JOURNAL_SOCKET_ENV = "SNPD_JOURNAL_SOCKET"
IDENTIFIER = "snpd"

# MESSAGE_IDs (systemd-id128 new), one per event type; the catalog documents each.
MESSAGE_IDS: Dict[str, str] = {
    "STARTUP_STATUS": "6f1c0e2b4f3a4d7c9a51d2e8b0c4a7f1",
    # The same facts again whenever they change after start-up (product or TCB
    # learned from the first report, state degraded or failed).
    "SEV_STATUS_CHANGED": "fa7582eb052f453786ccbc737feca547",
    "REPORT_ISSUED": "2d7b9a4e1c6f4b0a8e3d5c7f9b1a2e40",
    "KEY_DERIVED": "a3e5c7f9b1d24f6a8c0e2b4d6f8a1c35",
    "KDS_FETCH": "5b8d1f3a6c9e4b2d7f0a3c5e8b1d4f62",
    "VERIFY_FAILED": "c4f6a8b0d2e14c7a9e1b3d5f7a9c2e84",
    "DEVICE_ERROR": "8e0a2c4e6b8d4f1a3c5e7b9d1f3a5c76",
    "CLIENT_THROTTLED": "1f3b5d7f9a2c4e6b8d0f2a4c6e8b0d91",
    "VMPCK_DISABLED": "e9b1d3f5a7c94e2b6d8f0a2c4e6b8da3",
    "CERT_REJECTED": "7a9c1e3b5d7f4a2c8e0b2d4f6a8c0eb5",
    # A KBS released a resource or token to a caller, or did not (never the secret).
    "SECRET_RELEASED": "7633dea84841487c997cde42a2c6b3c8",
    "SECRET_FAILED": "91794e37f47d46f3b30b0de78ccbf9ff",
}

PRIORITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5,
              "info": 6, "debug": 7}


class Sink(Protocol):
    def send(self, fields: Mapping[str, str]) -> None: ...


def encode_native(fields: Mapping[str, str]) -> bytes:
    """The journal's native protocol: ``KEY=value\\n``, or ``KEY\\n<u64 le><bytes>\\n``
    for values holding a newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSink:
    """Datagrams to journald's socket; a send that fails falls back to ``fallback``."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: Optional[Sink] = None) -> None:
        self.path = path
        self.fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Mapping[str, str]) -> None:
        try:
            self._sock.sendto(encode_native(fields), self.path)
        except OSError:
            if self.fallback is not None:
                self.fallback.send(fields)

    def close(self) -> None:
        self._sock.close()


class StderrSink:
    """``<priority>message`` lines: journald's stream parser reads the prefix."""

    def __init__(self, stream: Optional[TextIO] = None, *, prefix: bool = True) -> None:
        self.stream = stream
        self.prefix = prefix
        self._lock = threading.Lock()

    def send(self, fields: Mapping[str, str]) -> None:
        stream = self.stream or sys.stderr
        head = f"<{fields.get('PRIORITY', '6')}>" if self.prefix else ""
        with self._lock:
            try:
                stream.write(f"{head}{fields.get('MESSAGE', '')}\n")
                stream.flush()
            except (OSError, ValueError):
                pass


def journal_socket_path() -> str:
    """journald's native socket: ``$SNPD_JOURNAL_SOCKET`` when set (for tests and for
    containers that forward a journal socket from elsewhere), else the fixed path
    libsystemd uses, ``/run/systemd/journal/socket``."""
    return os.environ.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET


def choose_sink(target: str = "auto") -> Sink:
    """journal when running under systemd with journald (JOURNAL_STREAM or INVOCATION_ID
    and the socket exists), stderr otherwise; ``target`` forces one. The journal's
    socket is :func:`journal_socket_path` (``$SNPD_JOURNAL_SOCKET`` overrides it)."""
    if target == "stderr":
        return StderrSink()
    path = journal_socket_path()
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    if target == "journal" or (under_systemd and os.path.exists(path)):
        return JournalSink(path, fallback=StderrSink())
    return StderrSink()


def chip_hash(chip_id: bytes) -> str:
    return hashlib.sha256(chip_id).hexdigest()[:16]


#: Per key: 10 records at once, then one every 10 s ([log] repeat_burst, repeat_interval_s).
DEFAULT_REPEAT_RATE = Rate(burst=10, interval=10.0)
#: Keys remembered at once; beyond it the least recently seen idle ones are forgotten.
MAX_REPEAT_KEYS = 4096


@dataclasses.dataclass
class _Held:
    bucket: TokenBucket
    suppressed: int = 0
    since: float = 0.0  # when the first of the suppressed records was held back
    last: Optional[Dict[str, str]] = None  # the last record held back


@dataclasses.dataclass(frozen=True)
class Suppressed:
    """What :meth:`Repeats.drain` hands back for one key: the last record held back,
    how many were, and over how many seconds."""

    record: Dict[str, str]
    count: int
    seconds: float


class Repeats:
    """A token bucket per key; counts the records it holds back. Thread-safe (events
    come from the loop and from KDS threads)."""

    def __init__(self, rate: Rate = DEFAULT_REPEAT_RATE, *, clock: Clock = time.monotonic,
                 max_keys: int = MAX_REPEAT_KEYS) -> None:
        self.rate = rate
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._keys: collections.OrderedDict[Hashable, _Held] = collections.OrderedDict()

    def admit(self, key: Hashable, record: Dict[str, str]) -> Optional[int]:
        """None: hold ``record`` back; else send it, and this many were held back
        since the last record sent for ``key``."""
        with self._lock:
            held = self._keys.get(key)
            if held is None:
                self._forget_idle()
                held = self._keys[key] = _Held(TokenBucket(self.rate, self._clock))
            self._keys.move_to_end(key)
            if not held.bucket.take():
                if held.suppressed == 0:
                    held.since = self._clock()
                held.suppressed += 1
                held.last = record
                return None
            count, held.suppressed, held.last = held.suppressed, 0, None
            return count

    def drain(self) -> List[Suppressed]:
        """Every key's held-back count (reset to 0) with its last record."""
        now = self._clock()
        out = []
        with self._lock:
            for held in self._keys.values():
                if held.suppressed and held.last is not None:
                    out.append(Suppressed(held.last, held.suppressed, now - held.since))
                    held.suppressed, held.last = 0, None
            self._forget_idle()
        return out

    def _forget_idle(self) -> None:
        """Keep at most ``max_keys``: drop idle keys (nothing held, bucket full), least
        recently seen first; a key still holding records back is dropped only when
        nothing else is left, and its count is lost."""
        if len(self._keys) < self._max_keys:
            return
        for key in [k for k, h in self._keys.items() if not h.suppressed and h.bucket.full()]:
            del self._keys[key]
        while len(self._keys) >= self._max_keys:
            self._keys.popitem(last=False)


class Events:
    """The daemon's event vocabulary. Each method builds the fields of one event type."""

    def __init__(self, sink: Sink, *, level: str = "info",
                 repeats: Optional[Repeats] = None) -> None:
        self.sink = sink
        self.max_priority = PRIORITIES.get(level, 6)
        # None: every record goes out (the daemon sets one from [log]).
        self.repeats = repeats

    def emit(self, event: Optional[str], priority: str, message: str, *,
             repeat_key: Optional[Hashable] = None, **fields: object) -> None:
        """Send one record. With ``repeat_key``, records of this event type and key are
        rate-limited (see :class:`Repeats`)."""
        prio = PRIORITIES[priority]
        if prio > self.max_priority:
            return
        out = {"MESSAGE": message, "PRIORITY": str(prio), "SYSLOG_IDENTIFIER": IDENTIFIER}
        if event is not None:
            out["MESSAGE_ID"] = MESSAGE_IDS[event]
            out["SNPD_EVENT"] = event
        for key, value in fields.items():
            if value is not None:
                out[f"SNPD_{key.upper()}"] = str(value)
        repeats = self.repeats
        if repeat_key is not None and repeats is not None:
            held = repeats.admit((event, repeat_key), out)
            if held is None:
                return
            if held:
                out["MESSAGE"] = f"{message} (suppressed {held} similar before this)"
                out["SNPD_SUPPRESSED"] = str(held)
        self.sink.send(out)

    def flush(self) -> None:
        """Report what :class:`Repeats` held back: one record per key, the last one held
        back, saying how many were. The daemon calls this every repeat interval."""
        if self.repeats is None:
            return
        for item in self.repeats.drain():
            out = dict(item.record)
            out["MESSAGE"] = (f"suppressed {item.count} similar in {item.seconds:.0f} s, "
                              f"the last: {item.record.get('MESSAGE', '')}")
            out["SNPD_SUPPRESSED"] = str(item.count)
            self.sink.send(out)

    @staticmethod
    def _caller(caller: Caller) -> Dict[str, object]:
        return {"caller_uid": caller.uid, "caller_pid": caller.pid,
                "transport": caller.transport}

    def log(self, priority: str, message: str, **fields: object) -> None:
        self.emit(None, priority, message, **fields)

    def startup_status(self, summary: str, **facts: object) -> None:
        """What the kernel log, sysfs and the backend showed at start-up, in words
        (snpd.status.summary.startup_message) and as SNPD_* fields."""
        self.emit("STARTUP_STATUS", "notice", summary, **facts)

    def sev_status_changed(self, summary: str, *, ready: bool = True, **facts: object) -> None:
        """The start-up facts again, after a change (snpd.status.summary.changed_message);
        a warning when the firmware channel is no longer ready."""
        self.emit("SEV_STATUS_CHANGED", "notice" if ready else "warning", summary, **facts)

    def report_issued(self, caller: Caller, vmpl: int, parsed: AttestationReport,
                      product: Optional[Product]) -> None:
        self.emit("REPORT_ISSUED", "info",
                  f"report issued to {caller.describe()} (VMPL {vmpl}, version "
                  f"{parsed.version})", vmpl=vmpl, report_version=parsed.version,
                  reported_tcb=f"0x{parsed.reported_tcb:016x}",
                  product=product.value if product else None,
                  chip=chip_hash(parsed.chip_id), **self._caller(caller))

    def key_derived(self, caller: Caller, kind: str, fields: Iterable[str]) -> None:
        names = ",".join(fields) or "none"
        self.emit("KEY_DERIVED", "info", f"{kind} key derived for {caller.describe()} "
                  f"(fields {names})", key_kind=kind, key_fields=names, **self._caller(caller))

    def request_failed(self, caller: Caller, op: str, exc: Exception) -> None:
        if isinstance(exc, Busy):
            self.emit("CLIENT_THROTTLED", "notice", f"{op} for {caller.describe()} refused: "
                      f"{exc}", repeat_key=caller.uid, operation=op,
                      limit=getattr(exc, "limit", None), **self._caller(caller))
        elif isinstance(exc, (DeviceError, Timeout, VmpckDisabled)):
            self.emit("DEVICE_ERROR", "err", f"{op} failed: {exc}", repeat_key=caller.uid,
                      operation=op, errno=getattr(exc, "errno", None),
                      fw_error=getattr(exc, "fw_error", None),
                      vmm_error=getattr(exc, "vmm_error", None), **self._caller(caller))

    def secret_released(self, caller: Caller, kbs: str, what: str) -> None:
        """``what``: ``resource REPO/TYPE/TAG`` or ``token``; never the secret itself."""
        self.emit("SECRET_RELEASED", "info", f"KBS {kbs} released {what} to "
                  f"{caller.describe()}", kbs=kbs, secret=what, **self._caller(caller))

    def secret_failed(self, caller: Caller, kbs: str, what: str, exc: Exception) -> None:
        self.emit("SECRET_FAILED", "warning", f"KBS {kbs}: {what} for {caller.describe()} "
                  f"failed: {exc}", repeat_key=(kbs, caller.uid), kbs=kbs, secret=what,
                  error=type(exc).__name__, **self._caller(caller))

    def vmpck_disabled(self, reason: str) -> None:
        self.emit("VMPCK_DISABLED", "crit", reason)

    def kds_fetch(self, what: str, outcome: str) -> None:
        # Failures are coalesced (a flood of forged chip IDs fails alike); fetched
        # certificates are each worth a record.
        failed = outcome.startswith("failed")
        self.emit("KDS_FETCH", "info", f"KDS: {what}: {outcome}",
                  repeat_key="failed" if failed else None, kds_what=what, kds_outcome=outcome)

    def certificate_rejected(self, source: str, reason: str) -> None:
        self.emit("CERT_REJECTED", "warning", f"certificates from {source} rejected: {reason}",
                  repeat_key=source, cert_source=source)

    def verification_failed(self, caller: Caller, failures: Iterable[str], *,
                            what: str = "report") -> None:
        names = ",".join(failures)
        self.emit("VERIFY_FAILED", "notice", f"{what} from {caller.describe()} did not "
                  f"verify: {names}", repeat_key=caller.uid, failures=names,
                  **self._caller(caller))
