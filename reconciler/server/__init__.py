"""The node's HTTP API (aiohttp): ``create_app`` and the app keys other routes use."""
from reconciler.server.app import create_app
from reconciler.server.errors import ApiError, status_response
from reconciler.server.keys import NODE, STORE, WATCHES, NodeInfo, Watches

__all__ = ["create_app", "ApiError", "status_response", "STORE", "NODE", "WATCHES", "NodeInfo", "Watches"]
