"""snpd: the AMD SEV-SNP attestation daemon and its library."""

__version__ = "0.1.0"
