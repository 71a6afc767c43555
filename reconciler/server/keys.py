"""Typed application keys: how handlers (ours and those mounted later) reach the node's parts.

Read them with ``request.config_dict[STORE]`` so sub-applications see them too."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from reconciler.store.base import Store


@dataclass(frozen=True)
class NodeInfo:
    name: str


class Watches:
    """The app's open watch streams: ended together at shutdown, counted for metrics."""

    def __init__(self, *, disconnect_check_s: float):
        self.closing = asyncio.Event()               # set at shutdown: every open watch ends
        self.disconnect_check_s = disconnect_check_s  # how often an idle watch checks its client is there
        self.open_count = 0


STORE: web.AppKey[Store] = web.AppKey("store", Store)
NODE: web.AppKey[NodeInfo] = web.AppKey("node", NodeInfo)
WATCHES: web.AppKey[Watches] = web.AppKey("watches", Watches)
