"""Child processes: bounded reads of their output, and stopping them in order.

Every wait is bounded (:data:`DEADLINE` is a safety net so that a broken child
fails a test or a benchmark instead of hanging it, never a measurement), and
every child is stopped the same way: SIGTERM, a bounded wait, SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
from pathlib import Path
from typing import IO, Any, Mapping, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0
_PR_SET_PDEATHSIG = 1


def readline(stream: IO[bytes], timeout: float) -> str:
    """One line from a child's stdout, decoded and stripped, or "" when none arrives
    within ``timeout`` (a child that hangs must not hang its parent)."""
    ready, _, _ = select.select([stream], [], [], max(0.0, timeout))
    return stream.readline().decode("utf-8", "replace").strip() if ready else ""


def stop_process(proc: subprocess.Popen[bytes], timeout: float = DEADLINE) -> int:
    """SIGTERM a child that still runs, wait (bounded), SIGKILL if it must; close its
    pipes. Its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return proc.returncode


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGTERM this child when its parent dies, however it dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def spawn(argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
          stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL,
          stderr: Any = subprocess.DEVNULL, cwd: Optional[Path] = None,
          die_with_parent: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv`` (in ``cwd``, default the repository root).

    ``die_with_parent``: in a session of its own (a Ctrl-C at the terminal reaches
    only the parent, which then stops its children in order) and with
    ``PR_SET_PDEATHSIG``, so that even a parent killed with SIGKILL leaves nothing
    behind. The kernel clears that signal when the child changes its uid (setpriv),
    and preexec_fn is only safe when the parent spawns from its only thread, which
    is why the tests' daemons and buses leave it off."""
    parent = os.getpid()
    return subprocess.Popen(
        list(argv), env=dict(env) if env is not None else None, stdin=stdin, stdout=stdout,
        stderr=stderr, cwd=str(cwd or REPO_ROOT), start_new_session=die_with_parent,
        preexec_fn=(lambda: _die_with_parent(parent)) if die_with_parent else None)


class Child:
    """A child process (:func:`spawn`) that is stopped in order: SIGTERM, a bounded
    wait, SIGKILL."""

    def __init__(self, argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                 stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL,
                 stderr: Any = subprocess.DEVNULL, cwd: Optional[Path] = None,
                 die_with_parent: bool = True) -> None:
        self.argv = list(argv)
        self.proc = spawn(self.argv, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                          cwd=cwd, die_with_parent=die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """Stop the process (if it still runs) and reap it; its exit status."""
        return stop_process(self.proc, timeout)
