"""The one set of process harnesses that the unit tests, the integration tests and
bench/ share: a private dbus-daemon (:mod:`.bus`), snpd as a child process that
reports READY=1 on NOTIFY_SOCKET (:mod:`.daemon`), and the child-process rules
both rest on (:mod:`.proc`); a private swtpm (:mod:`.swtpm`); a loopback Trustee KBS
over HTTPS, written from the protocol and not from snpd's client (:mod:`.kbs`,
test-only: it needs jwcrypto).

Imported as ``tests.harness``: bench/ puts the repository root on sys.path, and so
do the test modules that may run without it (tests/integration/dbusbus.py for its
child scripts, tests/unit/test_client_unavailable.py for the Debian build)."""
