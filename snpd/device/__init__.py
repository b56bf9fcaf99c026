"""Firmware-channel backends: the kernel's ioctl, configfs-tsm, and the emulator.

Only the daemon's broker (one worker thread) and ``snpctl --direct`` use these.
Backends report failures as typed errors (snpd.errors) and never retry in a way
that could cost the VMPCK; retry policy belongs to the broker.
"""

BACKENDS = ("auto", "ioctl", "configfs", "emulator")
"""The ``[device] backend`` values (and snpctl's ``--backend``): ``auto`` picks
ioctl or configfs, whichever this guest has."""
