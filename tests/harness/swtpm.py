"""A private swtpm: a real TPM 2.0 (libtpms) on a unix socket, fresh state each time.

It proves :mod:`snpd.abi.tpm2_commands` against a TPM that snpd did not write. It is
:class:`snpd.emulator.swtpm.SwtpmProcess` (the launcher ``snpd-emu vtpm`` uses) in a
fresh directory, after which TPM2_Startup(CLEAR) is sent, so the first command a test
sends is served. ``spec`` is what :func:`snpd.device.tpm.open_tpm` takes.

Facts of swtpm 0.7.1 / libtpms 0.9 the tests rely on (TPM2_GetCapability):
TPM_PT_NV_INDEX_MAX 2048 (an index of 2049 bytes is refused with TPM_RC_SIZE, so
Azure's 2600-byte HCL report index cannot be copied 1:1), TPM_PT_NV_BUFFER_MAX 1024,
TPM_PT_MAX_COMMAND_SIZE and TPM_PT_MAX_RESPONSE_SIZE 4096; the first TPM2_Quote after
start-up may answer TPM_RC_RETRY.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Optional, Type

from snpd.device.tpm import SocketChannel, Tpm
from snpd.emulator.swtpm import SWTPM, SwtpmProcess, connect

from .proc import DEADLINE

SWTPM_NV_INDEX_MAX = 2048
SWTPM_NV_BUFFER_MAX = 1024


def available() -> bool:
    return shutil.which(SWTPM) is not None


class Swtpm:
    """A started swtpm in its own directory; :meth:`close` stops and reaps it and
    removes the directory. The directory is short (``/tmp/snpd-swtpm-*``): a unix
    socket's path must fit in 108 bytes, which a pytest tmp_path may not."""

    def __init__(self, *, timeout: float = DEADLINE) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="snpd-swtpm-"))
        self.process = SwtpmProcess(self.directory / "state",
                                    socket_path=self.directory / "tpm.sock",
                                    start_timeout=timeout)
        try:
            self.process.start()
            # The socket exists once swtpm has bound it, which may be before it
            # listens: the first connection retries a refusal.
            sock = connect(self.process.socket_path, timeout=timeout)
            sock.settimeout(timeout)
            with Tpm(SocketChannel(str(self.process.socket_path), sock)) as tpm:
                tpm.startup()
        except BaseException:
            self.close()
            raise

    @property
    def spec(self) -> str:
        return self.process.spec

    def stop(self) -> Optional[int]:
        """Stop swtpm (SIGTERM, bounded wait, SIGKILL) and reap it; its exit status."""
        return self.process.stop(DEADLINE)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()
