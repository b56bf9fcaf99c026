"""A private swtpm: a real TPM 2.0 (libtpms) on a unix socket, fresh state each time.

It proves :mod:`snpd.abi.tpm2_commands` against a TPM that snpd did not write. Started
as ``swtpm socket --tpm2 --server type=unixio,path=SOCK --ctrl type=unixio,path=CTRL
--tpmstate dir=DIR --flags not-need-init,startup-clear``: it needs no INIT on the
control channel and has run TPM2_Startup(CLEAR) itself, so the first command a test
sends is served. ``spec`` is what :func:`snpd.device.tpm.open_tpm` takes.

Facts of swtpm 0.7.1 / libtpms 0.9 the tests rely on (TPM2_GetCapability):
TPM_PT_NV_INDEX_MAX 2048 (an index of 2049 bytes is refused with TPM_RC_SIZE, so
Azure's 2600-byte HCL report index cannot be copied 1:1), TPM_PT_NV_BUFFER_MAX 1024,
TPM_PT_MAX_COMMAND_SIZE and TPM_PT_MAX_RESPONSE_SIZE 4096; the first TPM2_Quote after
start-up may answer TPM_RC_RETRY.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Optional, Type

from .proc import DEADLINE, Child

SWTPM = "swtpm"
SWTPM_NV_INDEX_MAX = 2048
SWTPM_NV_BUFFER_MAX = 1024


def available() -> bool:
    return shutil.which(SWTPM) is not None


class Swtpm:
    """swtpm as a child process; the constructor returns once its socket accepts a
    connection (bounded by ``timeout``), :meth:`close` stops and reaps it and removes
    its directory. The directory is short (``/tmp/snpd-swtpm-*``): a unix socket's
    path must fit in 108 bytes, which a pytest tmp_path may not."""

    def __init__(self, *, timeout: float = DEADLINE) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="snpd-swtpm-"))
        self.socket = self.directory / "tpm.sock"
        self.ctrl = self.directory / "ctrl.sock"
        self.state = self.directory / "state"
        self.log_path = self.directory / "swtpm.log"
        self.child: Optional[Child] = None
        try:
            self.state.mkdir()
            with open(self.log_path, "wb") as log:
                self.child = Child(
                    [SWTPM, "socket", "--tpm2",
                     "--server", f"type=unixio,path={self.socket}",
                     "--ctrl", f"type=unixio,path={self.ctrl}",
                     "--tpmstate", f"dir={self.state}",
                     "--flags", "not-need-init,startup-clear"],
                    stdout=log, stderr=subprocess.STDOUT, die_with_parent=False)
            self._wait_listening(timeout)
        except BaseException:
            self.close()
            raise

    @property
    def spec(self) -> str:
        return f"unix:{self.socket}"

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_listening(self, timeout: float) -> None:
        assert self.child is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise RuntimeError(f"swtpm exited with status {self.child.proc.returncode}: "
                                   f"{self.log()[-2000:]}")
            if self.socket.exists():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.socket))
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            time.sleep(0.01)
        raise RuntimeError(f"swtpm did not listen on {self.socket} within {timeout:g} s: "
                           f"{self.log()[-2000:]}")

    def stop(self) -> Optional[int]:
        """Stop swtpm (SIGTERM, bounded wait, SIGKILL) and reap it; its exit status."""
        return self.child.stop(DEADLINE) if self.child is not None else None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()
