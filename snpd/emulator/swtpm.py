"""swtpm as a child process: the TPM 2.0 behind the emulated Azure paravisor.

``swtpm socket --tpm2 --server type=unixio,path=SOCK --tpmstate dir=DIR --flags
not-need-init``: raw TPM commands on a unix stream socket (one client at a time,
the next accepted when it leaves), no control channel (``not-need-init`` powers the
TPM on without CMD_INIT). The TPM still wants TPM2_Startup from its first client.

The child is always reaped: :meth:`SwtpmProcess.stop` (and leaving the ``with``) sends
SIGTERM, waits a bounded time, then SIGKILLs; a start that fails stops what it began;
and the child gets SIGTERM if its parent dies first (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from snpd.errors import DeviceUnavailable

SWTPM = "swtpm"
SOCKET_NAME = "swtpm.sock"
LOG_NAME = "swtpm.log"


_PR_SET_PDEATHSIG = 1


def _death_signal() -> Optional[Callable[[], None]]:
    """A pre-exec hook giving the child SIGTERM when the thread that started it dies, so
    a SIGKILLed snpd-emu or test run leaves no swtpm behind (Linux; None elsewhere).
    Resolved in the parent: the forked child must not import or load anything."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class SwtpmProcess:
    """One swtpm child serving ``state_dir`` (its NVRAM persists there across restarts)
    on a unix socket (``socket_path``, by default ``state_dir/swtpm.sock``).
    :attr:`spec` is the ``unix:`` channel spec to reach it."""

    def __init__(
        self,
        state_dir: Path,
        *,
        socket_path: Optional[Path] = None,
        binary: str = SWTPM,
        start_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.socket_path = Path(socket_path) if socket_path else self.state_dir / SOCKET_NAME
        self.binary = binary
        self.start_timeout = start_timeout
        self._clock = clock
        self._sleep = sleep
        self._process: Optional[subprocess.Popen[bytes]] = None

    @property
    def spec(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def command(self) -> List[str]:
        path = shutil.which(self.binary) or self.binary
        return [path, "socket", "--tpm2",
                "--server", f"type=unixio,path={self.socket_path}",
                "--tpmstate", f"dir={self.state_dir}",
                "--log", f"file={self.state_dir / LOG_NAME},level=1",
                "--flags", "not-need-init"]

    def start(self) -> SwtpmProcess:
        """Start swtpm and return once its socket exists (bounded by ``start_timeout``);
        swtpm may bind before it listens, so connect with :func:`connect`, which retries
        a refusal. Raises :class:`DeviceUnavailable` if it cannot start."""
        if self._process is not None:
            raise RuntimeError("swtpm is already running")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        remove_stale_socket(self.socket_path)  # a dead child's would refuse connections
        try:
            self._process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, close_fds=True, preexec_fn=_death_signal())
        except OSError as exc:
            raise DeviceUnavailable(f"cannot start {self.binary}: {exc}") from exc
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = self._clock() + self.start_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise DeviceUnavailable(f"swtpm exited with status {code} at start; see "
                                        f"{self.state_dir / LOG_NAME}")
            if self.socket_path.exists():
                # Probe only for the socket's existence: swtpm serves one client at a
                # time, and a probe connection would be accepted and then dropped.
                return
            if self._clock() >= deadline:
                raise DeviceUnavailable(f"swtpm did not create {self.socket_path} within "
                                        f"{self.start_timeout:g} s")
            self._sleep(0.02)

    def stop(self, timeout: float = 5.0) -> Optional[int]:
        """Terminate and reap swtpm (SIGKILL after ``timeout`` seconds); its exit status,
        or None when it was not running."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        remove_stale_socket(self.socket_path)
        return process.returncode

    def __enter__(self) -> SwtpmProcess:
        return self.start() if self._process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def remove_stale_socket(path: Path) -> None:
    """Remove ``path`` if it is a socket (a server's leftover); anything else there is
    someone's file, and binding over it fails with a clear error instead."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


MAX_FRAME = 8192  # swtpm's commands and responses are at most 4096 bytes (TPM_PT_MAX_*_SIZE)
HEADER_SIZE = 10  # tag u16, size u32, code u32; all big-endian


class FrameError(ValueError):
    """A peer sent bytes that are not one TPM command or response frame."""


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 65536))
        if not chunk:
            raise FrameError("the peer closed the connection inside a frame")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, *, limit: int = MAX_FRAME) -> Optional[bytes]:
    """One TPM frame (command or response) from ``sock``: its 10-byte header names
    its size (bytes 2..6, big-endian). None on a clean end of stream before a frame;
    :class:`FrameError` for a bad tag, a size out of 10..``limit`` or a cut-off frame."""
    first = sock.recv(HEADER_SIZE)
    if not first:
        return None
    header = first if len(first) == HEADER_SIZE else first + _read_exact(
        sock, HEADER_SIZE - len(first))
    tag = int.from_bytes(header[0:2], "big")
    size = int.from_bytes(header[2:6], "big")
    if tag not in (0x8001, 0x8002, 0x00C4):  # NO_SESSIONS, SESSIONS, TPM 1.2 RSP_COMMAND
        raise FrameError(f"tag 0x{tag:04x} is not a TPM 2.0 tag")
    if not HEADER_SIZE <= size <= limit:
        raise FrameError(f"frame size {size} is not {HEADER_SIZE}..{limit}")
    return header + _read_exact(sock, size - HEADER_SIZE)


def connect(path: Path, *, timeout: float = 10.0,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> socket.socket:
    """A connected unix stream socket to ``path`` (swtpm's or the paravisor's),
    retrying a refused or missing socket until ``timeout`` (a server that just bound
    it may not listen yet)."""
    deadline = clock() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if clock() >= deadline:
                raise
            sleep(0.02)
        except OSError:
            sock.close()
            raise


class SocketChannel:
    """A TPM channel over a unix stream socket: one command, one response
    (``transact``), callers serialized by a lock. What the paravisor forwards to."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._sock = connect(self.path)
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()

    def transact(self, command: bytes) -> bytes:
        with self._lock:
            self._sock.sendall(command)
            response = read_frame(self._sock)
        if response is None:
            raise DeviceUnavailable(f"the TPM at {self.path} closed the connection")
        return response

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SocketChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
