"""Trustee Key Broker Service (KBS) protocol, sans I/O: RFC 8785 canonical JSON
(:mod:`.jcs`), the RCAR messages and the evidence binding (:mod:`.protocol`), and the
TEE key that decrypts resources (:mod:`.jwe`). Bytes in, bytes out; the HTTP client
lives elsewhere and builds on these."""
