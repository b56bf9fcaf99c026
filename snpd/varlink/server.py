"""snpd's varlink server: an asyncio AF_UNIX stream server in front of the Service.

It is a transport and nothing more (docs/architecture.md, "Layers"): it establishes who is calling
from the kernel (``SO_PEERCRED``, ``SO_PEERGROUPS``), decodes each call with the
sans-IO :mod:`snpd.varlink.protocol`, turns the JSON parameters into the
service's typed values (null ``vmpl``: the guest's own), calls the same
:class:`~snpd.service.Service` coroutine the D-Bus method calls, and encodes the
result as JSON or maps the typed error. Authorization is the service's table
(:mod:`snpd.access`), asked before options are read and again by the method.

Why in-tree and not a library: docs/reference/stack.md §6 — no maintained varlink library
is packaged in the distributions; the protocol is small enough to own, and the
tests hold it to an independent client.

Shape of a connection: calls are read and answered strictly in order (varlink
clients may pipeline; replies must keep the calls' order), one at a time, so a
connection holds at most one request in the broker. Different connections run
concurrently, and one connection's bad input or a bug in a method never affects
another.

What a local user can make the daemon hold is bounded per uid, not only per
connection, because a user can open as many connections as it likes:

- connections: at most ``max_connections_per_uid`` per uid and
  ``max_connections`` in all; root is held to neither cap but to the total plus
  ``root_reserved_connections``, so that other users filling the server never
  lock the operator out. A refused connection is closed unanswered and logged
  at most once per ``LOG_INTERVAL`` per uid, with the count of those left out.
- buffered input: the bytes of messages not yet complete (and of the one being
  served) count against the uid's ``max_buffer_bytes_per_uid`` and everyone's
  ``max_buffer_bytes`` (root: the total plus ``root_reserved_buffer_bytes``),
  on top of each connection's ``max_message``. The accounting comes *before*
  the bytes are read: nothing is taken from the kernel until a connection is
  readable and then no more than the budgets have room for. That is why the
  server reads raw non-blocking sockets (``loop.sock_accept``, ``recv``,
  ``loop.sock_sendall``) rather than asyncio streams, whose transports read
  ahead into a StreamReader buffer of their own (up to twice its ``limit`` plus
  a 256 KiB recv, per connection) that no budget would see. A connection that
  would go over its uid's (or the global) budget is answered
  ``org.snpd.Manager.Busy`` and closed; other users' connections go on.
- time: between messages a connection may stay silent ``idle_timeout``
  seconds; once the first byte of a message has arrived, the whole message must
  arrive within ``message_timeout`` seconds (a deadline, not a per-read
  timeout, so that a byte now and then cannot hold a connection and its
  buffer forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno as errno_module
import logging
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    FrozenSet,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Sequence,
    Tuple,
)

from snpd import __version__
from snpd.access import Caller, proc_credentials
from snpd.errors import DeviceError, SnpdError
from snpd.files import chmod_own
from snpd.ratelimit import LogLimiter
from snpd.service import (
    CERTIFICATE_OPTIONS,
    TIMEOUT_OPTION,
    CertificateOptions,
    KeyRequest,
    ReportOptions,
    SealingKeyRequest,
    ServiceAPI,
    VerifyOptions,
    check_options,
)
from snpd.status.summary import by_interface
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Verdict
from snpd.varlink.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_MESSAGE,
    SERVICE_INTERFACE,
    UINT32_MAX,
    UINT64_MAX,
    CallError,
    Field,
    Framer,
    Kind,
    ProtocolError,
    check_parameters,
    decode_call,
    encode_bytes,
    encode_error,
    encode_reply,
    interface_not_found,
    invalid_parameter,
    method_not_found,
    split_method,
    to_json,
)

INTERFACES = ("org.snpd.Attestation", "org.snpd.Keys", "org.snpd.Secrets", "org.snpd.Manager")
TRANSPORT = "varlink"
READ_CHUNK = 1 << 16  # the most one recv() takes in; the budgets may allow less
ROOT_UID = 0
LOG_INTERVAL = 10.0  # seconds between two log lines of one kind about one uid
ACCEPT_RETRY = 1.0  # seconds to wait after accept() failed (out of descriptors, say)
# The error for input over a byte budget. The message's interface is not known
# before the message is complete, so the daemon-wide interface names it.
BUSY_ERROR = "org.snpd.Manager.Busy"
LISTEN_BACKLOG = 128
SD_LISTEN_FDS_START = 3
ACTIVATION_NAME = "varlink"  # FileDescriptorName= in snpd.socket
# asm-generic value, used by x86-64 (the only SEV-SNP guest architecture) and
# arm64; Python's socket module does not export it. Elsewhere: /proc only.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_PEERGROUPS_MACHINES = frozenset({"x86_64", "aarch64"})
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_PEERGROUPS_BUFFER = 1024  # the most socket.getsockopt() accepts: 256 gid_t

# The standard interface's definition, verbatim from varlink.org (with the later
# PermissionDenied and ExpectedMore errors), served by GetInterfaceDescription.
SERVICE_DESCRIPTION = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"""


Params = Dict[str, Any]
Handler = Callable[[Caller, Params], Awaitable[Params]]


@dataclasses.dataclass(frozen=True)
class Method:
    """A method's parameters (checked before the handler runs) and its handler."""

    fields: Tuple[Field, ...]
    handler: Handler


# -- socket activation and binding ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ListenFd:
    """One socket-activated file descriptor and its FileDescriptorName=."""

    fd: int
    name: str


def listen_fds(environ: Optional[MutableMapping[str, str]] = None, *,
               pid: Optional[int] = None, unset: bool = True) -> List[ListenFd]:
    """The descriptors systemd passed, as sd_listen_fds_with_names(3) reads them.

    ``LISTEN_PID`` must be this process (``pid``, default os.getpid()): the
    variables are inherited by children, which must not take the sockets for
    theirs. With ``unset`` the three variables are removed whether or not they
    applied, for the same reason. Returns [] when nothing was passed; raises
    ValueError on malformed variables (a broken unit should fail loudly).
    """
    env = os.environ if environ is None else environ
    raw_pid = env.get("LISTEN_PID")
    raw_fds = env.get("LISTEN_FDS")
    raw_names = env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if raw_pid is None or raw_fds is None:
        return []
    try:
        listen_pid = int(raw_pid)
        count = int(raw_fds)
    except ValueError:
        raise ValueError(f"malformed LISTEN_PID={raw_pid!r} or LISTEN_FDS={raw_fds!r}"
                         ) from None
    if listen_pid != (os.getpid() if pid is None else pid):
        return []
    if not 0 <= count <= 4096:
        raise ValueError(f"LISTEN_FDS={count} is out of range")
    names = raw_names.split(":") if raw_names is not None else ["unknown"] * count
    if len(names) != count:
        raise ValueError(f"LISTEN_FDNAMES names {len(names)} descriptors, "
                         f"LISTEN_FDS says {count}")
    return [ListenFd(SD_LISTEN_FDS_START + i, names[i]) for i in range(count)]


def adopt_socket(fd: int) -> socket.socket:
    """Wrap an inherited listening AF_UNIX stream socket (close-on-exec, non-blocking).

    Raises ValueError, leaving ``fd`` open, if it is anything else: a unit that
    passes the wrong socket must not be served half-working.
    """
    sock = socket.socket(fileno=fd)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            raise ValueError(f"fd {fd} is not a listening AF_UNIX stream socket")
    except BaseException:
        sock.detach()
        raise
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


def activation_sockets(fds: Sequence[ListenFd], name: str = ACTIVATION_NAME
                       ) -> List[socket.socket]:
    """The passed sockets named ``name`` (all of them when systemd named none)."""
    chosen = [f for f in fds if f.name == name] or [f for f in fds if f.name == "unknown"]
    sockets: List[socket.socket] = []
    try:
        for item in chosen:
            sockets.append(adopt_socket(item.fd))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def remove_stale_socket(path: str) -> None:
    """Remove a socket file a dead server left behind; refuse to touch anything else.

    A socket someone still listens on is not stale (EADDRINUSE): two daemons must
    not steal each other's socket. A path that is not a socket is never removed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno_module.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except BlockingIOError:
        pass  # a live listener with a full backlog
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise OSError(errno_module.EADDRINUSE, "another server is listening on", path)


def bind_socket(path: str, mode: int = 0o660) -> socket.socket:
    """A listening socket at ``path`` with ``mode``, set before listen() so nobody
    connects through a wider mode in between. The mode is set without following a
    link (files.chmod_own): when root runs the daemon on a directory another user can
    write, that user could swap a symlink in for the socket between bind() and the
    chmod, and a plain os.chmod would change the mode of the link's target."""
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        chmod_own(path, mode, stat.S_IFSOCK)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- peer identity ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerCredentials:
    """The kernel's record of a connected peer (effective ids at connect())."""

    pid: int
    uid: int
    gid: int
    groups: FrozenSet[int]


def _peer_groups_sockopt(sock: Any) -> Optional[FrozenSet[int]]:
    """The peer's supplementary groups as the kernel recorded them at connect(),
    or None where that is unavailable: kernels before 4.13 (ENOPROTOOPT), and
    peers in more than 256 groups, because Python caps getsockopt() buffers at
    1024 bytes (ERANGE)."""
    if not hasattr(socket, "SO_PEERGROUPS") and os.uname().machine not in _PEERGROUPS_MACHINES:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PEERGROUPS_BUFFER)
    except OSError:
        return None
    count = len(raw) // 4
    return frozenset(struct.unpack(f"{count}I", raw[:count * 4]))


def peer_credentials(sock: Any) -> PeerCredentials:
    """Who is on the other end of a connected AF_UNIX socket, from the kernel.

    uid and gid are the effective ids at connect() time (SO_PEERCRED). Groups
    include the effective gid.
    """
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    groups = _peer_groups_sockopt(sock)
    if groups is None:  # racy; see proc_credentials
        groups = proc_credentials(pid, uid)
    return PeerCredentials(pid, uid, gid, groups | {gid})


# -- the server ------------------------------------------------------------------------------


class _Quota:
    """Units of one resource (connections, buffered bytes) held per uid, under a
    per-uid cap and a global cap, with a reserve above the global cap for root.

    root is held to the global cap plus its reserve only, not to the per-uid cap:
    it is the operator, and the reserve is what still serves it once other users
    have taken everything they may. The server's mutable bookkeeping, not a value.
    """

    def __init__(self, per_uid: int, total: int, root_reserve: int, *,
                 per_uid_key: str, total_key: str) -> None:
        if per_uid < 1 or total < 1 or root_reserve < 0:
            raise ValueError(f"{per_uid_key} and {total_key} must be positive, "
                             "root's reserve not negative")
        self.per_uid = per_uid
        self.total = total
        self.root_reserve = root_reserve
        self.per_uid_key = per_uid_key
        self.total_key = total_key
        self.used = 0
        self._held: Dict[int, int] = {}

    def held(self, uid: int) -> int:
        return self._held.get(uid, 0)

    def room(self, uid: int) -> int:
        """How many more units ``uid`` may take now."""
        if uid == ROOT_UID:
            return max(0, self.total + self.root_reserve - self.used)
        return max(0, min(self.per_uid - self.held(uid), self.total - self.used))

    def add(self, uid: int, amount: int) -> None:
        """Take (``amount`` > 0) or give back (< 0) units; callers check room() first."""
        held = self.held(uid) + amount
        if held < 0:
            raise AssertionError(f"uid {uid} gives back more than it holds")
        if held:
            self._held[uid] = held
        else:
            self._held.pop(uid, None)
        self.used += amount

    def binding(self, uid: int) -> str:
        """The configuration key of the cap that leaves ``uid`` no room."""
        if uid != ROOT_UID and self.held(uid) >= self.per_uid:
            return self.per_uid_key
        return self.total_key

    def describe(self, uid: int) -> str:
        """For the log: what ``uid`` and everyone hold, and the caps."""
        reserve = f" (+ {self.root_reserve} for root)" if self.root_reserve else ""
        return (f"uid {uid} holds {self.held(uid)}, all {self.used}; "
                f"{self.per_uid_key} = {self.per_uid}, {self.total_key} = {self.total}{reserve}")


class _Connection:
    """One client connection's mutable bookkeeping (the server's, not a value)."""

    def __init__(self, number: int, caller: Caller, sock: socket.socket) -> None:
        self.number = number
        self.caller = caller
        self.sock = sock
        self.task: Optional[asyncio.Task[None]] = None
        self.busy = False
        self.buffered = 0  # bytes charged to the caller's uid in the buffer budget
        # When the first byte of the message being read arrived (None between messages).
        self.message_started: Optional[float] = None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _readable(sock: socket.socket) -> None:
    """Until ``sock`` has something to read (bytes, EOF or an error), reading none
    of it: how much to take is decided afterwards, against the budgets."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


def _snpd_error(interface: str, exc: SnpdError) -> bytes:
    parameters: Dict[str, Any] = {"message": str(exc)}
    if isinstance(exc, DeviceError):
        for key in ("errno", "fw_error", "vmm_error"):
            value = getattr(exc, key)
            if value is not None:
                parameters[key] = value
    return encode_error(exc.varlink_name(interface), parameters)


def _certificates(certs: CertificateSet) -> List[Dict[str, str]]:
    return [{"kind": kind, "data": encode_bytes(item.der)} for kind, item in certs.items()]


def _timeout(value: Optional[Mapping[str, Any]], what: str) -> ReportOptions:
    return ReportOptions(**check_options(value or {}, TIMEOUT_OPTION, what))


# Varlink methods whose name in the access table (snpd.access.METHODS) differs.
_ACCESS = {"Describe": "GetProperties"}
_OPTIONS = Field("options", Kind.OBJECT, optional=True)
_VMPL = Field("vmpl", Kind.INT, optional=True, maximum=UINT32_MAX)


class VarlinkServer:
    """Serves the org.snpd.* interfaces and org.varlink.service on Unix sockets.

    ``await bind(path)`` or ``await adopt(sock)`` (socket activation), any number
    of times; ``await close()`` stops accepting, lets calls in flight finish and
    answers them, then closes every connection. The bounds are the module
    docstring's. Tests replace ``clock`` (monotonic seconds: message deadlines,
    log rate limits) and ``credentials`` (who a connected socket's peer is).
    """

    def __init__(
        self,
        service: ServiceAPI,
        *,
        vendor: str = "snpd",
        product: str = "snpd",
        version: str = __version__,
        url: str = "",
        max_connections: int = 256,
        max_connections_per_uid: int = 32,
        root_reserved_connections: int = 16,
        max_buffer_bytes: int = 32 << 20,
        max_buffer_bytes_per_uid: int = 4 << 20,
        root_reserved_buffer_bytes: int = 4 << 20,
        idle_timeout: float = 60.0,
        message_timeout: float = 10.0,
        max_message: int = MAX_MESSAGE,
        logger: Optional[logging.Logger] = None,
        clock: Callable[[], float] = time.monotonic,
        credentials: Callable[[socket.socket], PeerCredentials] = peer_credentials,
    ) -> None:
        if not idle_timeout > 0 or not message_timeout > 0:
            raise ValueError("idle_timeout and message_timeout must be positive")
        self.service = service
        self.info = {"vendor": vendor, "product": product, "version": version, "url": url,
                     "interfaces": [SERVICE_INTERFACE, *INTERFACES]}
        self.slots = _Quota(max_connections_per_uid, max_connections, root_reserved_connections,
                            per_uid_key="varlink.max_connections_per_uid",
                            total_key="varlink.max_connections")
        self.buffers = _Quota(max_buffer_bytes_per_uid, max_buffer_bytes,
                              root_reserved_buffer_bytes,
                              per_uid_key="varlink.max_buffer_bytes_per_uid",
                              total_key="varlink.max_buffer_bytes")
        self.idle_timeout = idle_timeout
        self.message_timeout = message_timeout
        self.max_message = max_message
        self.clock = clock
        self.credentials = credentials
        self.log = logger or logging.getLogger(__name__)
        self._log_limiter = LogLimiter(LOG_INTERVAL, clock)
        self.descriptions = {SERVICE_INTERFACE: SERVICE_DESCRIPTION}
        for name in INTERFACES:  # the package is installed as files: no importlib.resources
            self.descriptions[name] = Path(__file__).with_name(f"{name}.varlink").read_text(
                encoding="utf-8")
        self.methods: Dict[str, Method] = self._method_table()
        self._listeners: List[Tuple[socket.socket, asyncio.Task[None]]] = []
        self._bound: List[Tuple[str, int, int]] = []  # path, st_dev, st_ino
        self._connections: Dict[int, _Connection] = {}
        self._accepted = 0
        self._closing = False

    # -- listening ------------------------------------------------------------------------

    async def bind(self, path: str, mode: int = 0o660) -> None:
        """Listen on ``path`` (mode 0660: owner and group; a stale socket is replaced)."""
        if self._closing:
            raise RuntimeError("the server is closed")
        sock = bind_socket(path, mode)
        st = os.stat(path)
        self._bound.append((path, st.st_dev, st.st_ino))
        await self.adopt(sock)

    async def adopt(self, sock: socket.socket) -> None:
        """Serve on an already listening socket (socket activation); takes ownership.
        Closing it later leaves its file alone: an activated socket's file is
        systemd's (the next start needs it), and close() removes what bind() made."""
        if self._closing:
            sock.close()
            raise RuntimeError("the server is closed")
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        self._listeners.append((sock, task))

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def close(self, timeout: Optional[float] = None) -> None:
        """Stop accepting; let calls in flight finish (cancel them after ``timeout``
        seconds, if given) and send their replies; close every connection; remove
        the socket files this server bound."""
        self._closing = True
        for _, task in self._listeners:
            task.cancel()
        await asyncio.gather(*(task for _, task in self._listeners), return_exceptions=True)
        for sock, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        for conn in list(self._connections.values()):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        tasks = [conn.task for conn in self._connections.values() if conn.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for path, dev, ino in self._bound:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
        self._bound.clear()

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept and admit (or refuse) connections until cancelled. Each wake-up
        drains the backlog, as asyncio's own servers do: while it is full, a
        client's non-blocking connect() fails at once with EAGAIN, so a flood of
        connections must not keep it full."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
                self._admit(sock)
                for _ in range(LISTEN_BACKLOG):
                    sock, _ = listener.accept()
                    sock.setblocking(False)
                    self._admit(sock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait for some to free
                self._log_limited(logging.ERROR, "accept", -1,
                                  "varlink: accept failed: %s; retrying", exc)
                await asyncio.sleep(ACCEPT_RETRY)

    # -- connections ------------------------------------------------------------------------

    def _log_limited(self, level: int, event: str, uid: int, message: str,
                     *args: object) -> None:
        """``self.log.log`` at most once per LOG_INTERVAL per (event, uid); never
        pass it anything the client sent."""
        left_out = self._log_limiter.admit(event, uid)
        if left_out is None:
            return
        if left_out:
            message += "; %d similar suppressed in the last %g s"
            args += (left_out, LOG_INTERVAL)
        self.log.log(level, message, *args)

    def _admit(self, sock: socket.socket) -> None:
        """Track a new connection at once (so close() cannot miss it), or refuse it
        by closing it unanswered when its uid's share or the server is full."""
        if self._closing:
            sock.close()
            return
        try:
            creds = self.credentials(sock)
        except (OSError, struct.error) as exc:
            self._log_limited(logging.WARNING, "credentials", -1,
                              "varlink: cannot read peer credentials: %s", exc)
            sock.close()
            return
        if self.slots.room(creds.uid) < 1:
            self._log_limited(logging.WARNING, "refused", creds.uid,
                              "varlink: too many connections; refusing uid %d pid %d (%s)",
                              creds.uid, creds.pid, self.slots.describe(creds.uid))
            sock.close()
            return
        self.slots.add(creds.uid, 1)
        self._accepted += 1
        number = self._accepted
        caller = Caller(uid=creds.uid, gids=creds.groups, pid=creds.pid,
                        transport=TRANSPORT, peer=f"varlink#{number}")
        conn = _Connection(number, caller, sock)
        self._connections[number] = conn
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn))

    def _charge(self, conn: _Connection, buffered: int) -> None:
        """Set what ``conn`` holds in its uid's buffer budget."""
        self.buffers.add(conn.caller.uid, buffered - conn.buffered)
        conn.buffered = buffered

    async def _serve(self, conn: _Connection) -> None:
        framer = Framer(self.max_message)
        try:
            while True:
                try:
                    message = framer.next_message()
                except ProtocolError as exc:
                    self._log_limited(logging.INFO, "protocol", conn.caller.uid,
                                      "varlink: %s: %s; closing", conn.caller.describe(),
                                      exc.reason)
                    await self._write(conn.sock, exc.encode())
                    return
                if message is None:
                    if self._closing:
                        return
                    data = await self._receive(conn, framer.pending)
                    if not data:
                        return
                    framer.feed(data)
                    continue
                conn.busy = True
                try:
                    reply, fatal = await self._handle(conn.caller, message)
                    if reply is not None:
                        await self._write(conn.sock, reply)
                finally:
                    conn.busy = False
                del message
                self._charge(conn, framer.pending)
                conn.message_started = None
                if fatal or self._closing:
                    return
        except (ConnectionError, asyncio.TimeoutError):
            pass  # the peer went away, or stopped reading its replies
        except Exception:
            self.log.exception("varlink: connection %d failed", conn.number)
        finally:
            del self._connections[conn.number]
            self.slots.add(conn.caller.uid, -1)
            self._charge(conn, 0)
            conn.sock.close()

    async def _receive(self, conn: _Connection, pending: int) -> Optional[bytes]:
        """The next bytes of ``conn`` (``pending`` are buffered already), or None to
        close it: the peer is done, stayed idle, missed the message deadline or
        would go over a budget (then it is told Busy first)."""
        caller = conn.caller
        while True:
            if not pending:
                conn.message_started = None
                timeout = self.idle_timeout
            else:
                if conn.message_started is None:  # what is left after pipelined calls
                    conn.message_started = self.clock()
                timeout = conn.message_started + self.message_timeout - self.clock()
                if timeout <= 0:
                    self._log_limited(logging.INFO, "deadline", caller.uid,
                                      "varlink: %s sent %d bytes of a message but not "
                                      "the rest within %g s; closing", caller.describe(),
                                      pending, self.message_timeout)
                    return None
            try:
                await asyncio.wait_for(_readable(conn.sock), timeout)
            except asyncio.TimeoutError:
                if not pending:
                    self.log.debug("varlink: %s idle; closing", caller.describe())
                    return None
                continue  # the deadline, reported above
            room = min(READ_CHUNK, self.max_message + 1 - pending,
                       self.buffers.room(caller.uid))
            if room < 1:
                self._log_limited(logging.WARNING, "buffer", caller.uid,
                                  "varlink: %s would buffer more bytes than allowed (%s); "
                                  "closing", caller.describe(),
                                  self.buffers.describe(caller.uid))
                await self._write(conn.sock, encode_error(BUSY_ERROR, {
                    "message": "the daemon buffers no more varlink input now "
                               f"({self.buffers.binding(caller.uid)}); retry later"}))
                return None
            try:
                data = conn.sock.recv(room)
            except (BlockingIOError, InterruptedError):
                continue
            if data:
                self._charge(conn, conn.buffered + len(data))
                if not pending:
                    conn.message_started = self.clock()
            return data

    async def _write(self, sock: socket.socket, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_sendall(sock, data), self.idle_timeout)

    async def _handle(self, caller: Caller, message: bytes) -> Tuple[Optional[bytes], bool]:
        """One message in, (reply or None for oneway, close-after) out; never raises
        except for cancellation."""
        try:
            call = decode_call(message)
        except ProtocolError as exc:
            self.log.info("varlink: %s: %s; closing", caller.describe(), exc.reason)
            return exc.encode(), True
        interface = call.interface
        try:
            if call.upgrade:
                raise invalid_parameter("upgrade", "no snpd method supports 'upgrade'")
            result = await self._dispatch(caller, call.method, call.parameters)
            reply = encode_reply(result)
        except CallError as exc:
            self.log.debug("varlink: %s: %s: %s", caller.describe(), call.method, exc.reason)
            reply = exc.encode()
        except SnpdError as exc:
            reply = _snpd_error(interface, exc)
        except Exception:
            self.log.exception("varlink: %s failed for %s", call.method, caller.describe())
            reply = encode_error(f"{interface}.Internal", {
                "message": f"internal error in {call.method}; the daemon's journal has "
                           "the details"})
        return (None if call.oneway else reply), False

    async def _dispatch(self, caller: Caller, name: str, parameters: Mapping[str, Any]
                        ) -> Params:
        interface, member = split_method(name)
        if interface == SERVICE_INTERFACE:
            return self._service_method(member, name, parameters)
        if interface not in INTERFACES:
            raise interface_not_found(interface)
        method = self.methods.get(name)
        if method is None:
            raise method_not_found(name)
        checked = check_parameters(parameters, method.fields)
        # Who may call comes before what the options say (as on D-Bus).
        self.service.check(caller, _ACCESS.get(member, member))
        return await method.handler(caller, checked)

    def _service_method(self, member: str, name: str, parameters: Mapping[str, Any]
                        ) -> Params:
        if member == "GetInfo":
            check_parameters(parameters, ())
            return dict(self.info)
        if member == "GetInterfaceDescription":
            wanted = check_parameters(parameters, (Field("interface", Kind.STRING),))
            description = self.descriptions.get(wanted["interface"])
            if description is None:
                raise interface_not_found(wanted["interface"])
            return {"description": description}
        raise method_not_found(name)

    # -- org.snpd.* -----------------------------------------------------------------------------

    def _method_table(self) -> Dict[str, Method]:
        report_fields = (Field("report_data", Kind.BYTES), _VMPL, _OPTIONS)
        verify_options = (
            Field("certificates", Kind.CERTIFICATES, optional=True),
            Field("at", Kind.INT, optional=True, minimum=INT64_MIN, maximum=INT64_MAX),
            Field("policy", Kind.STRING, optional=True),
            Field("product", Kind.STRING, optional=True),
        )
        return {
            "org.snpd.Attestation.GetReport": Method(report_fields, self._get_report),
            "org.snpd.Attestation.GetExtendedReport": Method(report_fields,
                                                             self._get_extended_report),
            "org.snpd.Attestation.GetCertificates": Method((_OPTIONS,),
                                                           self._get_certificates),
            "org.snpd.Attestation.VerifyReport": Method((
                Field("report", Kind.BYTES), *verify_options), self._verify_report),
            "org.snpd.Attestation.VerifyEvidence": Method((
                Field("format", Kind.STRING), Field("evidence", Kind.BYTES),
                Field("nonce", Kind.BYTES), *verify_options), self._verify_evidence),
            "org.snpd.Attestation.GetEvidence": Method((
                Field("format", Kind.STRING), Field("nonce", Kind.BYTES), _OPTIONS,
            ), self._get_evidence),
            "org.snpd.Keys.DeriveKey": Method((
                Field("root_key", Kind.STRING),
                Field("fields", Kind.STRINGS),
                _VMPL,
                Field("guest_svn", Kind.INT, optional=True, maximum=UINT32_MAX),
                Field("tcb_version", Kind.INT, optional=True, maximum=UINT64_MAX),
                _OPTIONS,
            ), self._derive_key),
            "org.snpd.Keys.DeriveSealingKey": Method((
                Field("label", Kind.STRING),
                Field("fields", Kind.STRINGS, optional=True),
                _OPTIONS,
            ), self._derive_sealing_key),
            "org.snpd.Secrets.GetResource": Method((
                Field("kbs", Kind.STRING), Field("path", Kind.STRING), _OPTIONS,
            ), self._get_resource),
            "org.snpd.Secrets.GetToken": Method((Field("kbs", Kind.STRING), _OPTIONS),
                                                self._get_token),
            "org.snpd.Manager.RefreshCertificates": Method((), self._refresh_certificates),
            "org.snpd.Manager.GetProperties": Method((), self._get_properties),
            "org.snpd.Manager.Describe": Method((), self._describe),
        }

    async def _get_report(self, caller: Caller, p: Params) -> Params:
        report = await self.service.get_report(caller, p["report_data"], p["vmpl"],
                                               _timeout(p["options"], "GetReport"))
        return {"report": encode_bytes(report)}

    async def _get_extended_report(self, caller: Caller, p: Params) -> Params:
        extended = await self.service.get_extended_report(
            caller, p["report_data"], p["vmpl"], _timeout(p["options"], "GetExtendedReport"))
        return {"report": encode_bytes(extended.report),
                "certificates": _certificates(extended.certificates)}

    async def _get_certificates(self, caller: Caller, p: Params) -> Params:
        options = CertificateOptions(**check_options(p["options"] or {}, CERTIFICATE_OPTIONS,
                                                     "GetCertificates"))
        return {"certificates": _certificates(await self.service.get_certificates(
            caller, options))}

    async def _verify_report(self, caller: Caller, p: Params) -> Params:
        return _verdict(await self.service.verify_report(caller, p["report"],
                                                         _verify_options(p)))

    async def _verify_evidence(self, caller: Caller, p: Params) -> Params:
        return _verdict(await self.service.verify_evidence(
            caller, p["format"], p["evidence"], p["nonce"], _verify_options(p)))

    async def _get_evidence(self, caller: Caller, p: Params) -> Params:
        evidence = await self.service.get_evidence(caller, p["format"], p["nonce"],
                                                   _timeout(p["options"], "GetEvidence"))
        return {"media_type": evidence.media_type, "evidence": encode_bytes(evidence.data)}

    async def _derive_key(self, caller: Caller, p: Params) -> Params:
        request = KeyRequest(p["root_key"], tuple(p["fields"]), p["vmpl"],
                             p["guest_svn"] or 0, p["tcb_version"] or 0)
        key = await self.service.derive_key(caller, request,
                                            _timeout(p["options"], "DeriveKey"))
        return {"key": encode_bytes(key)}

    async def _derive_sealing_key(self, caller: Caller, p: Params) -> Params:
        request = SealingKeyRequest(p["label"], tuple(p["fields"] or ()))
        key = await self.service.derive_sealing_key(caller, request,
                                                    _timeout(p["options"], "DeriveSealingKey"))
        return {"key": encode_bytes(key)}

    async def _get_resource(self, caller: Caller, p: Params) -> Params:
        check_options(p["options"] or {}, {}, "GetResource")
        resource = await self.service.get_resource(caller, p["kbs"], p["path"])
        return {"resource": encode_bytes(resource)}

    async def _get_token(self, caller: Caller, p: Params) -> Params:
        check_options(p["options"] or {}, {}, "GetToken")
        return {"token": await self.service.get_token(caller, p["kbs"])}

    async def _refresh_certificates(self, caller: Caller, p: Params) -> Params:
        await self.service.refresh_certificates(caller)
        return {}

    async def _describe(self, caller: Caller, p: Params) -> Params:
        """The typed properties (org.snpd.Manager.Properties)."""
        return {"properties": to_json(vars(self.service.properties(caller)))}

    async def _get_properties(self, caller: Caller, p: Params) -> Params:
        """The shape of varlink interface 1 (by D-Bus interface name), kept for the
        clients that read it; new clients call Describe."""
        return {"properties": to_json(by_interface(vars(self.service.properties(caller))))}


def _verify_options(p: Params) -> VerifyOptions:
    return VerifyOptions.from_plain(certificates=p["certificates"], at=p["at"],
                                    policy=p["policy"], product=p["product"])


def _verdict(verdict: Verdict) -> Params:
    return {
        "valid": verdict.valid,
        "product": verdict.product.value if verdict.product else "",
        "failures": [c.name for c in verdict.failures],
        "checks": [{"name": c.name, "status": c.status.value, "detail": c.detail}
                   for c in verdict.checks],
    }
