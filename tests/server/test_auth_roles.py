"""The route → role table, walked over every route of a real node's app with a token of each role."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from reconciler.config import NodeConfig
from reconciler.datapath.stage import StageServer
from reconciler.formation import raft_settings
from reconciler.inference.cluster import ClusterBackend
from reconciler.node import ExoNode
from reconciler.server.auth import GRANTS, MEMBER, PUBLIC, AUTHENTICATED, ROLES, is_listed, required_role
from reconciler.server.openapi import app_routes
from reconciler.store.raft import RaftStore

SECRET = "walk-the-table-secret"
ROOT = {"Authorization": f"Bearer {SECRET}"}

# The policy in words, independent of the table: (method, path, roles that may).
POLICY = [
    ("GET", "/apis/exo.dev/v1alpha1/namespaces/{namespace}/modeldeployments", {"admin", "edit", "view"}),
    ("PATCH", "/apis/exo.dev/v1alpha1/namespaces/{namespace}/modeldeployments/{name}", {"admin", "edit"}),
    ("DELETE", "/apis/exo.dev/v1alpha1/namespaces/{namespace}/modeldeployments/{name}", {"admin", "edit"}),
    ("PUT", "/apis/exo.dev/v1alpha1/nodes/{name}", {"admin"}),
    ("DELETE", "/apis/exo.dev/v1alpha1/shards/{name}", {"admin"}),
    ("GET", "/apis/exo.dev/v1alpha1/shards", {"admin", "edit", "view"}),
    ("GET", "/metrics", {"admin", "edit", "view"}),
    ("GET", "/sd", {"admin", "edit", "view"}),
    ("POST", "/v1/chat/completions", {"admin", "edit", "view", "inference"}),
    ("GET", "/v1/models", {"admin", "edit", "view", "inference"}),
    ("GET", "/internal/dashboard/v1/throughput", {"admin", "edit", "view"}),
    ("POST", "/admin/v1/tokens", {"admin"}),
    ("DELETE", "/admin/v1/tokens/{id}", {"admin"}),
]


def free_port_pair() -> int:
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def node_config(tmp_path: Path) -> NodeConfig:
    port = free_port_pair()
    return NodeConfig(name="node-a", data_dir=tmp_path, host="127.0.0.1", advertise_host="127.0.0.1",
                      api_port=port, raft_port=port + 1, peers=(), secret=SECRET, node_id=str(uuid.uuid4()))


@pytest.fixture
async def node_app(tmp_path: Path) -> AsyncIterator[tuple[web.Application, str]]:
    """The node's full HTTP app (what ExoNode serves) on a one-node Raft store, served on loopback."""
    config = node_config(tmp_path)
    store = RaftStore(raft_settings(config, ()))
    for _ in range(200):
        if store.has_quorum:
            break
        await asyncio.sleep(0.05)
    backend = ClusterBackend(store=store, data_token=config.keys.data_path)
    app = ExoNode(config).build_http_app(store, stage_server=StageServer(token=config.keys.data_path), backend=backend)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await backend.close()
        await runner.cleanup()
        await store.close()


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: "default" if m.group(0) == "{namespace}" else "x", path)


async def status_of(session: aiohttp.ClientSession, method: str, url: str, headers: dict) -> tuple[int, str]:
    """The status and the error message (Status or OpenAI shape); streams are left after the headers."""
    async with session.request(method, url, headers={**headers, "Content-Type": "application/json"},
                               data=b"{}" if method in ("POST", "PUT", "PATCH") else None) as resp:
        if resp.status < 400:
            return resp.status, ""
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            return resp.status, text
        if not isinstance(body, dict):
            return resp.status, text
        error = body.get("error")   # OpenAI/Anthropic: {"error": {"message"}}, Ollama: {"error": "..."}
        return resp.status, body.get("message") or (error.get("message", "") if isinstance(error, dict) else str(error))


async def mint(session: aiohttp.ClientSession, base: str, role: str) -> str:
    async with session.post(base + "/admin/v1/tokens", json={"role": role, "description": f"walk {role}"},
                            headers=ROOT) as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["token"]


def test_the_policy_in_words_matches_the_route_table() -> None:
    for method, path, allowed in POLICY:
        role = required_role(method, path)
        assert {r for r in ROLES if role in GRANTS[r]} == allowed, (method, path, role)


def test_a_route_missing_from_the_table_is_admin_only_and_reported_unlisted() -> None:
    assert not is_listed("GET", "/brand-new/route")
    assert required_role("GET", "/brand-new/route") == "admin"


async def test_every_route_of_the_node_answers_each_role_as_the_table_says(node_app) -> None:
    app, base = node_app
    routes = sorted(app_routes(app))
    unlisted = [r for r in routes if not is_listed(*r)]
    assert not unlisted, f"routes without a role in reconciler/server/auth.py ROUTE_ROLES: {unlisted}"
    timeout = aiohttp.ClientTimeout(total=10, sock_read=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tokens = {role: await mint(session, base, role) for role in ROLES}
        for method, path in routes:
            needed = required_role(method, path)
            if needed == PUBLIC:
                status, _ = await status_of(session, method, base + concrete(path), {})
                assert status not in (401, 403), (method, path)
                continue
            status, _ = await status_of(session, method, base + concrete(path), {})
            assert status == 401, f"{method} {path} without a token answered {status}"
            for role, token in tokens.items():
                status, message = await status_of(session, method, base + concrete(path),
                                                  {"Authorization": f"Bearer {token}"})
                if needed == MEMBER:   # node-to-node: the member proof, or an admin
                    allowed = role == "admin"
                else:
                    allowed = needed == AUTHENTICATED or needed in GRANTS[role]
                if allowed:
                    assert status not in (401, 403), f"{role} refused {status} on {method} {path}: {message}"
                elif needed == MEMBER:
                    assert status == 401, f"{role} got {status} on {method} {path}"
                else:
                    assert status == 403, f"{role} got {status} on {method} {path}"
                    assert f'needs role "{needed}"' in message and f'has role "{role}"' in message, message
