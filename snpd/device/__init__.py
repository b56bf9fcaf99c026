"""Firmware-channel backends: the kernel's ioctl, configfs-tsm, Azure's vTPM, and the
emulator.

Only the daemon's broker (one worker thread) and ``snpctl --direct`` use these.
Backends report failures as typed errors (snpd.errors) and never retry in a way
that could cost the VMPCK; retry policy belongs to the broker.
"""

BACKENDS = ("auto", "ioctl", "configfs", "azure", "emulator")
"""The ``[device] backend`` values (and snpctl's ``--backend``): ``auto`` picks
azure on a Hyper-V SNP-isolated guest (an Azure CVM), else ioctl or configfs,
whichever this guest has."""
