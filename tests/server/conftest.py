"""A node API app on loopback, backed by the in-memory store."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from reconciler.server import create_app
from reconciler.store.memory import MemoryStore

from tests.server.server_helpers import TOKEN


class NodeLikeServer(TestServer):
    """A test server that, like the node's ``AppRunner``, does not cancel a handler when its client
    leaves (aiohttp's TestServer does), so the API must notice departures itself."""

    async def _make_runner(self, **kwargs):
        kwargs["handler_cancellation"] = False
        return await super()._make_runner(**kwargs)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def client(store: MemoryStore, caplog: pytest.LogCaptureFixture) -> AsyncIterator[TestClient]:
    """The test client; at the end, asserts that no request reached the 500 catch-all."""
    app = create_app(store=store, token=TOKEN, node_name="node-a", watch_disconnect_check_s=0.05)
    async with TestClient(NodeLikeServer(app, host="127.0.0.1")) as test_client:
        yield test_client
    errors = [r for r in caplog.records if r.name.startswith(("reconciler.server", "aiohttp")) and r.levelno >= logging.ERROR]
    assert not errors, f"unexpected server errors: {[r.getMessage() for r in errors]}"
