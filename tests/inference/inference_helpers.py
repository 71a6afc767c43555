"""The API token, and a node API app with the OpenAI routes served on loopback."""
from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from reconciler.metrics import NodeMetrics
from reconciler.server import create_app
from reconciler.server.openai_api import add_openai_routes
from reconciler.store.memory import MemoryStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class NodeLikeServer(TestServer):
    """Like the node's ``AppRunner``: a handler is cancelled when its client leaves."""

    async def _make_runner(self, **kwargs):
        kwargs["handler_cancellation"] = True
        return await super()._make_runner(**kwargs)


async def serve(backend, *, metrics: NodeMetrics | None = None, **limits: int) -> TestClient:
    """``limits``: add_openai_routes's max_concurrent / max_queued."""
    app = create_app(store=MemoryStore(), token=TOKEN, node_name="node-a")
    add_openai_routes(app, backend=backend, metrics=metrics, **limits)
    return TestClient(NodeLikeServer(app, host="127.0.0.1"))
