"""A private ``dbus-daemon`` that nothing else uses, with the policy a test asks for.

- ``"shipped"``: the §5.1 template (conf/dbus/private-system-bus.conf.in, the stock
  system bus's default policy) with a ``system.d/`` holding a copy of the shipped
  ``conf/dbus/org.snpd.Snpd1.conf``, so that the policy under test is the file
  that ships;
- ``"permissive"``: that, plus a mandatory allow-all for sends to org.snpd.Snpd1,
  so that only the daemon's own re-check stands between a caller and the Service;
- ``"allow-all"``: a session-style bus on which anyone may own any name and send
  anything (the benchmark runs the daemon as whoever runs it, and the shipped
  policy lets only user snpd own org.snpd.Snpd1).

The socket's directory is world-traversable: unprivileged test users connect to it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Dict, Literal, Optional, Type
from xml.sax.saxutils import escape

from .proc import DEADLINE, REPO_ROOT, Child, readline

Policy = Literal["shipped", "permissive", "allow-all"]

SHIPPED_POLICY = REPO_ROOT / "conf" / "dbus" / "org.snpd.Snpd1.conf"
# docs/reference/stack.md §5.1, verbatim but for the comment. Read when a bus needs
# it: the .deb build runs the unit tests from a copy of tests/ without conf/, and
# those use only the allow-all bus.
BUS_CONF_TEMPLATE = REPO_ROOT / "conf" / "dbus" / "private-system-bus.conf.in"

# Added beside the shipped policy: "mandatory" rules apply after every other, so
# anyone may call anything and only the daemon's own re-check stands between a
# caller and the Service.
PERMISSIVE_POLICY = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="mandatory">
    <allow send_destination="org.snpd.Snpd1"/>
  </policy>
</busconfig>
"""

# A whole configuration, not a policy beside the template: the benchmark's figures
# were taken on it, and a session-style bus admits only its own uid.
ALLOW_ALL_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def _system_d(policy: Policy) -> Dict[str, str]:
    """The files (name -> XML) of the template's ``system.d/`` for ``policy``."""
    if policy == "allow-all":
        return {}
    files = {"org.snpd.Snpd1.conf": SHIPPED_POLICY.read_text(encoding="utf-8")}
    if policy == "permissive":
        files["zz-snpd-test-permissive.conf"] = PERMISSIVE_POLICY
    return files


class PrivateBus:
    """``dbus-daemon --nofork`` on a socket in ``directory`` (default: a fresh
    world-traversable one, removed by :meth:`close`), configured for ``policy``.
    The constructor returns once the bus listens (bounded by ``timeout``).

    ``die_with_parent``: see :func:`tests.harness.proc.spawn` (the benchmark's
    rule; tests leave it off)."""

    def __init__(self, policy: Policy = "shipped", *, directory: Optional[Path] = None,
                 timeout: float = DEADLINE, die_with_parent: bool = False) -> None:
        self._own_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="snpd-bus-")) if directory is None \
            else directory
        try:
            if self._own_directory:
                self.directory.chmod(0o755)
            self.socket = self.directory / "system_bus_socket"
            conf = self.directory / "bus.conf"
            if policy == "allow-all":
                text = ALLOW_ALL_CONFIG.format(socket=escape(str(self.socket)))
            else:
                system_d = self.directory / "system.d"
                system_d.mkdir()
                for name, xml in _system_d(policy).items():
                    (system_d / name).write_text(xml, encoding="utf-8")
                text = BUS_CONF_TEMPLATE.read_text(encoding="utf-8").replace(
                    "@SOCKET@", escape(str(self.socket)))
            conf.write_text(text, encoding="utf-8")
            self.log_path = self.directory / "dbus-daemon.log"
            with open(self.log_path, "wb") as log:
                self.child = Child(["dbus-daemon", f"--config-file={conf}", "--nofork",
                                    "--nopidfile", "--print-address=1"],
                                   stdout=subprocess.PIPE, stderr=log,
                                   die_with_parent=die_with_parent)
        except BaseException:
            self._remove_directory()
            raise
        assert self.child.proc.stdout is not None
        line = readline(self.child.proc.stdout, timeout)
        if not line:
            self.close()
            raise RuntimeError(f"dbus-daemon did not start within {timeout:g} s: "
                               f"{self.daemon_log()[-2000:]}")
        self.address = line.split(",guid=")[0]

    @classmethod
    def shipped(cls, *, permissive: bool = False) -> PrivateBus:
        """The shipped policy (plus the permissive one)."""
        return cls("permissive" if permissive else "shipped")

    def daemon_log(self) -> str:
        """What dbus-daemon wrote to stderr (its warnings and policy denials)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        """The dbus-daemon's pid (to stop and continue it)."""
        return self.child.pid

    def close(self) -> None:
        """Stop dbus-daemon; remove the directory if this bus made it."""
        self.child.stop(DEADLINE)
        self._remove_directory()

    def _remove_directory(self) -> None:
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PrivateBus:
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self.close()
