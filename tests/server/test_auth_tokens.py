"""Derived keys, the root credential's transport rule, token minting and checking, and the audit
annotation, over the real app (MemoryStore) on loopback."""
from __future__ import annotations

import ssl
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request

from reconciler.cluster_keys import cluster_keys
from reconciler.server.auth import LAST_WRITER, AuthError, authenticate
from reconciler.server.auth_tokens import new_token
from reconciler.server.keys import STORE
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.server.server_helpers import APPLY, AUTH, MD_PATH, TOKEN

TOKENS = "/admin/v1/tokens"


class PeerTransport:
    """What a request's transport tells about its connection: the peer and, over TLS, the context."""

    def __init__(self, peer: str, *, tls: bool = False) -> None:
        self.extra = {"peername": (peer, 40000), "sslcontext": ssl.create_default_context() if tls else None}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


def request_from(peer: str, token: str, *, tls: bool = False, store: MemoryStore | None = None) -> web.Request:
    app = web.Application()
    app[STORE] = store or MemoryStore()
    return make_mocked_request("GET", "/apis", headers={"Authorization": f"Bearer {token}"}, app=app,
                               transport=PeerTransport(peer, tls=tls))


async def mint(client: TestClient, role: str, **extra: Any) -> dict:
    response = await client.post(TOKENS, json={"role": role, **extra}, headers=AUTH)
    assert response.status == 201, await response.text()
    return await response.json()


def test_each_derived_key_differs_from_the_secret_and_the_others_and_none_is_printed():
    keys = cluster_keys("the-secret")
    derived = [keys.raft_password, keys.data_path, keys.member]
    assert len(set(derived)) == 3 and "the-secret" not in "".join(derived)
    assert cluster_keys("the-secret").raft_password == keys.raft_password
    assert cluster_keys("another").raft_password != keys.raft_password
    assert "the-secret" not in repr(keys) and keys.raft_password not in repr(keys)


def test_the_cluster_secret_is_admin_from_loopback_or_over_tls_and_refused_over_plain_lan_http():
    assert authenticate(request_from("127.0.0.1", "root-secret"), root="root-secret").role == "admin"
    assert authenticate(request_from("::1", "root-secret"), root="root-secret").role == "admin"
    assert authenticate(request_from("192.0.2.7", "root-secret", tls=True), root="root-secret").role == "admin"
    with pytest.raises(AuthError, match="only over TLS or from loopback"):
        authenticate(request_from("192.0.2.7", "root-secret"), root="root-secret")


async def test_a_token_is_refused_once_it_expires_on_the_replica_clock():
    store = MemoryStore()
    raw, obj = new_token(role="view", description="", ttl_s=60, now=1_000_000.0, created_by="t")
    await store.submit(make_command("create", ("ApiToken", "", obj["metadata"]["name"]), body=obj))
    request = request_from("192.0.2.7", raw, store=store)
    assert authenticate(request, root="root", clock=lambda: 1_000_059.0).role == "view"
    with pytest.raises(AuthError, match="expired"):
        authenticate(request, root="root", clock=lambda: 1_000_060.0)
    assert authenticate(request_from("192.0.2.7", raw[:-1] + "x", store=store), root="root") is None


async def test_the_store_keeps_only_the_hash_and_listing_shows_no_value(client: TestClient, store: MemoryStore):
    created = await mint(client, "view", description="grafana")
    assert created["token"].startswith("exo_" + created["id"] + "_")
    assert created["token"] not in repr(store.state.objects)
    listed = await (await client.get(TOKENS, headers=AUTH)).json()
    assert [(t["id"], t["role"], t["description"], t["state"]) for t in listed["items"]] == [
        (created["id"], "view", "grafana", "active")]
    assert "sha256" not in repr(listed) and created["token"] not in repr(listed)


@pytest.mark.parametrize("body, field", [({"role": "root"}, "role"), ({"role": "view", "ttlSeconds": 0}, "ttlSeconds"),
                                         ({"role": "view", "ttlSeconds": "1d"}, "ttlSeconds"),
                                         ({"role": "view", "owner": "me"}, "owner"),
                                         ({"role": "view", "description": 5}, "description")])
async def test_a_bad_token_request_is_a_422_naming_the_field(client: TestClient, body: dict, field: str):
    response = await client.post(TOKENS, json=body, headers=AUTH)
    assert response.status == 422
    assert (await response.json())["message"].startswith(f"{field}:")


async def test_a_forbidden_call_is_a_403_status_naming_the_role_needed(client: TestClient):
    view = await mint(client, "view")
    response = await client.post(MD_PATH, json={}, headers={"Authorization": f"Bearer {view['token']}"})
    body = await response.json()
    assert response.status == 403 and body["kind"] == "Status" and body["reason"] == "Forbidden"
    assert 'needs role "edit"' in body["message"] and view["token"] not in body["message"]
    inference = await mint(client, "inference")
    response = await client.get("/v1/models", headers={"Authorization": f"Bearer {inference['token']}"})
    assert response.status != 403
    response = await client.get(MD_PATH, headers={"Authorization": f"Bearer {inference['token']}"})
    assert response.status == 403


async def test_each_write_records_the_writers_token_id_and_user_agent(client: TestClient):
    editor = await mint(client, "edit")
    manifest = ("apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: llama}\n"
                "spec: {model: {source: hf://org/model}}\n")
    response = await client.patch(MD_PATH + "/llama", data=manifest, headers={
        **APPLY, "Authorization": f"Bearer {editor['token']}", "User-Agent": "exoctl/0.1 (ci)"})
    assert response.status == 201, await response.text()
    annotations = (await response.json())["metadata"]["annotations"]
    assert annotations[LAST_WRITER] == f"token {editor['id']} (edit); exoctl/0.1 (ci)"
    response = await client.patch(MD_PATH + "/llama", data=manifest, headers={**APPLY, "User-Agent": "kubectl/1.30"})
    assert (await response.json())["metadata"]["annotations"][LAST_WRITER] == "token cluster-secret (admin); kubectl/1.30"
    assert TOKEN not in repr(annotations)


def test_an_x_api_key_header_counts_only_on_the_anthropic_messages_route():
    app = web.Application()
    app[STORE] = MemoryStore()

    def with_key(path: str) -> web.Request:
        return make_mocked_request("POST", path, headers={"x-api-key": "root-secret"}, app=app,
                                   transport=PeerTransport("127.0.0.1"))

    assert authenticate(with_key("/v1/messages"), root="root-secret").role == "admin"
    assert authenticate(with_key("/v1/chat/completions"), root="root-secret") is None
