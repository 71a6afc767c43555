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
    """Like the node's ``AppRunner``, does not cancel a handler when its client leaves (aiohttp's
    TestServer does), so the API must notice departures itself."""

    async def _make_runner(self, **kwargs):
        kwargs["handler_cancellation"] = False
        return await super()._make_runner(**kwargs)


async def serve(backend, *, metrics: NodeMetrics | None = None) -> TestClient:
    app = create_app(store=MemoryStore(), token=TOKEN, node_name="node-a")
    add_openai_routes(app, backend=backend, metrics=metrics)
    return TestClient(NodeLikeServer(app, host="127.0.0.1"))
