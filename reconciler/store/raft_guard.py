"""Bounds on what PySyncObj 0.3.17 buffers from a connection to the Raft port.

Upstream reads a 4-byte length and then buffers until that many bytes have arrived, whoever sent
them: a non-member that sends ``0x7fffffff`` and keeps writing grows the node by all it sends
(measured: +140 MB RSS for 100 MB of garbage). Here a declared length above the bound (or below 0)
drops the connection at once, and a peer none of whose messages has decrypted yet gets its first
message parsed, so authenticated or dropped, before any more of its bytes are read.
"""
from __future__ import annotations

import logging
import struct

from pysyncobj.tcp_connection import TcpConnection

log = logging.getLogger(__name__)

UNTRUSTED_MESSAGE_BYTES = 1 << 16  # a connection's first message (its handshake) is a few hundred bytes
TRUSTED_MESSAGE_BYTES = 256 << 20  # a member's largest: an append batch, a snapshot chunk or one big entry
_LENGTH = struct.Struct("i")  # upstream's native-order length prefix


def install() -> None:
    """Patch TcpConnection once (idempotent); every SyncObj in the process is then bounded."""
    if getattr(TcpConnection, "_exo_bounded", False):
        return
    read = TcpConnection._TcpConnection__processRead  # type: ignore[attr-defined]
    parse = TcpConnection._TcpConnection__processParseMessage  # type: ignore[attr-defined]
    disconnect = TcpConnection.disconnect

    def bounded_read(self: TcpConnection) -> bool:
        more = read(self)
        buffer = self._TcpConnection__readBuffer  # type: ignore[attr-defined]
        if not more or len(buffer) < _LENGTH.size:
            return more
        declared = _LENGTH.unpack_from(buffer)[0]
        trusted = getattr(self, "_exo_trusted", False)
        if not 0 <= declared <= (TRUSTED_MESSAGE_BYTES if trusted else UNTRUSTED_MESSAGE_BYTES):
            log.warning("raft port: dropping a connection that announced a %d-byte message%s", declared,
                        "" if trusted else " before authenticating")
            self.disconnect()
            return False
        return trusted or len(buffer) < _LENGTH.size + declared  # untrusted: parse its first message first

    def tracked_parse(self: TcpConnection) -> object:
        message = parse(self)
        if message is not None:
            self._exo_trusted = True  # it decrypted with the cluster's Raft password
        return message

    def untrusting_disconnect(self: TcpConnection) -> None:
        self._exo_trusted = False
        disconnect(self)

    TcpConnection._TcpConnection__processRead = bounded_read  # type: ignore[attr-defined]
    TcpConnection._TcpConnection__processParseMessage = tracked_parse  # type: ignore[attr-defined]
    TcpConnection.disconnect = untrusting_disconnect  # type: ignore[method-assign]
    TcpConnection._exo_bounded = True  # type: ignore[attr-defined]
