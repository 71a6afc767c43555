"""Authentication, health endpoints and Status errors for unknown paths and methods."""
import pytest
from aiohttp import web

from reconciler.server import NODE, STORE
from reconciler.server.app import token_matches
from reconciler.store.base import make_command

from tests.server.server_helpers import AUTH, MD_PATH, TOKEN


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": "Bearer"},
])
async def test_api_without_the_right_token_answers_401_status_and_nothing_else(client, store, headers):
    await store.submit(make_command(
        "create", ("Node", "", "secret-node"),
        body={"apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": "secret-node"},
              "spec": {"nodeId": "x", "address": "127.0.0.1", "apiPort": 1, "raftPort": 2}}))
    for path in (MD_PATH, "/apis/exo.dev/v1alpha1/nodes/secret-node", "/apis/nothing-here", "/internal/members"):
        response = await client.get(path, headers=headers)
        assert response.status == 401
        body = await response.json()
        assert body["kind"] == "Status" and body["code"] == 401 and body["reason"] == "Unauthorized"
        assert "secret-node" not in await response.text()
        assert set(body) == {"kind", "apiVersion", "metadata", "status", "message", "reason", "code"}


async def test_writes_without_token_are_refused_before_reading_the_body(client, store):
    response = await client.post(MD_PATH, data=b"{not json")
    assert response.status == 401
    assert store.revision == 0


async def test_health_endpoints_need_no_token(client, store):
    assert (await client.get("/healthz")).status == 200
    assert await (await client.get("/healthz")).text() == "ok"
    assert (await client.get("/readyz")).status == 200
    store.quorum = False
    assert (await client.get("/readyz")).status == 503


async def test_unknown_api_path_is_a_404_status(client):
    response = await client.get("/apis/exo.dev/v1alpha1/widgets", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["kind"] == "Status"


async def test_wrong_method_is_a_405_status_naming_the_allowed_ones(client):
    response = await client.post("/apis/exo.dev/v1alpha1/modeldeployments", headers=AUTH, json={})
    assert response.status == 405
    assert (await response.json())["reason"] == "MethodNotAllowed"
    assert "GET" in response.headers["Allow"]


async def test_token_comparison_accepts_only_the_exact_bearer_token():
    assert token_matches("Bearer abc", "abc")
    assert token_matches("bearer abc", "abc")
    assert not token_matches("Bearer abcd", "abc")
    assert not token_matches(None, "abc")
    assert not token_matches("Bearer ", "abc")


async def test_store_and_node_name_are_reachable_by_routes_mounted_later(store):
    from aiohttp.test_utils import TestClient, TestServer

    from reconciler.server import create_app

    app = create_app(store=store, token=TOKEN, node_name="node-b")

    async def members(request: web.Request) -> web.Response:
        return web.json_response({"node": request.config_dict[NODE].name, "revision": request.config_dict[STORE].revision})

    app.router.add_get("/internal/members", members)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert (await client.get("/internal/members")).status == 401
        response = await client.get("/internal/members", headers=AUTH)
        assert await response.json() == {"node": "node-b", "revision": 0}


async def test_unexpected_error_is_a_logged_500_status_without_a_traceback(store, caplog):
    from aiohttp.test_utils import TestClient, TestServer

    from reconciler.server import create_app

    app = create_app(store=store, token=TOKEN, node_name="node-a")

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app.router.add_get("/internal/broken", broken)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        response = await client.get("/internal/broken", headers=AUTH)
        assert response.status == 500
        body = await response.json()
        assert body["kind"] == "Status" and "secret internals" not in await response.text()
    assert any("secret internals" in (r.exc_text or "") for r in caplog.records if r.name == "reconciler.server.app")
