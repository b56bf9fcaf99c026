"""A software SEV-SNP firmware for development and tests (like swtpm for TPM).

Never trusted by default verification: its root is trusted only when the
emulator backend is configured or the root is passed explicitly.
"""
