"""varlink for snpd: the interface definitions (``*.varlink``, package data), a
sans-IO protocol core, an asyncio Unix-socket server and a small client.

This package imports nothing on purpose: ``snpctl`` imports
:mod:`snpd.varlink.client` on every command, and that must not pull in the
server, asyncio or the protocol core.
"""
