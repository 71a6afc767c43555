"""Is anything listening at HOST:PORT? The one TCP probe that joins and discovery both use."""
from __future__ import annotations

import asyncio


async def tcp_reachable(address: str, *, timeout: float = 2.0) -> bool:
    """True when ``address`` (``host:port``) accepts a TCP connection within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True
