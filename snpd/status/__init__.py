"""Guest-side SEV status: what the kernel log, sysfs and device nodes say."""
