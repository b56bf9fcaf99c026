"""The D-Bus transport (org.snpd.Snpd1 on the system bus).

Kept apart from :mod:`snpd.service` so that nothing but the daemon imports
dbus-fast: ``snpctl`` and the library stay free of it. The checked-in
introspection XML (``org.snpd.Snpd1.xml``) ships as package data beside the code
that serves it.
"""

from snpd.bundled import use_bundled_dbus_fast

use_bundled_dbus_fast()
