"""Growing the Raft group: the ``/internal/v1/members`` routes and the joining client.

A newcomer starts its Raft peer first (partners = the current members, learned from any member),
then asks a member to add it. The member forwards to the leader; the leader adds one node at a
time, and only after it has reached the newcomer's raft port over TCP (adding an unreachable node
to a small group can lose quorum for good).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from exo_ctl.api.status import status_object
from reconciler.server.auth import is_admin
from reconciler.reachability import tcp_reachable
from reconciler.store.base import StoreUnavailable
from reconciler.store.raft import RaftStore

log = logging.getLogger(__name__)

MEMBERS_PATH = "/internal/v1/members"
_JOIN_LOCK = web.AppKey("exo_join_lock", asyncio.Lock)


class JoinError(Exception):
    """The node could not learn the members or get admitted; the message is for the user."""


class SecretRefused(JoinError):
    """A member answered 401: this node's secret is not the cluster's. Retrying cannot help."""


@dataclass(frozen=True)
class MemberInfo:
    raft_address: str
    node_id: str
    api_url: str

    def to_json(self) -> dict[str, str]:
        return {"raftAddress": self.raft_address, "nodeId": self.node_id, "apiUrl": self.api_url}


def parse_member_info(body: Any) -> MemberInfo:
    """Validate a join request body; raises ValueError naming the field."""
    if not isinstance(body, dict):
        raise ValueError("body: expected a JSON object")
    values = {}
    for field in ("raftAddress", "nodeId", "apiUrl"):
        value = body.get(field)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{field}: required string")
        values[field] = value
    host, sep, port = values["raftAddress"].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"raftAddress: {values['raftAddress']!r} is not HOST:PORT")
    return MemberInfo(values["raftAddress"], values["nodeId"], values["apiUrl"])


def members_document(store: RaftStore) -> dict[str, Any]:
    view, directory = store.view, store.directory
    leader_url = directory.get(view.leader or "", {}).get("apiUrl")
    return {
        "self": view.self_address, "leader": view.leader, "leaderApiUrl": leader_url,
        "quorum": view.quorum, "term": view.term,
        "members": [{"raftAddress": m, **directory.get(m, {}), "leader": m == view.leader}
                    for m in view.members],
    }


def _error(code: int, message: str) -> web.Response:
    return web.json_response(status_object(code, message), status=code)


def add_membership_routes(app: web.Application, *, store: RaftStore, secret: str,
                          add_timeout: float = 5.0, client_ssl: ssl.SSLContext | None = None) -> None:
    """Mount GET/POST /internal/v1/members. Requests carry ``secret``, the member proof derived
    from the cluster secret (cluster_keys), as a bearer token, or are an admin's (server/auth)."""
    app[_JOIN_LOCK] = asyncio.Lock()

    def authorized(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        return hmac.compare_digest(header.encode(), f"Bearer {secret}".encode()) or is_admin(request)

    async def get_members(request: web.Request) -> web.Response:
        if not authorized(request):
            return _error(401, "missing or wrong bearer token")
        return web.json_response(members_document(store))

    async def post_member(request: web.Request) -> web.Response:
        if not authorized(request):
            return _error(401, "missing or wrong bearer token")
        try:
            info = parse_member_info(await request.json())
        except ValueError as exc:
            return _error(400 if "body" in str(exc) or "JSON" in str(exc) else 422, str(exc))
        if not store.is_leader:
            return await _forward_to_leader(request, store=store, info=info, client_ssl=client_ssl)
        async with request.app[_JOIN_LOCK]:
            return await _admit(store, info, timeout=add_timeout)

    app.router.add_get(MEMBERS_PATH, get_members)
    app.router.add_post(MEMBERS_PATH, post_member)


async def _admit(store: RaftStore, info: MemberInfo, *, timeout: float) -> web.Response:
    """On the leader, holding the join lock: add one reachable node."""
    already = info.raft_address in store.members
    if not already:
        if not await tcp_reachable(info.raft_address):
            return _error(422, f"raftAddress: {info.raft_address} is not reachable from the leader; "
                               "start the node (and open its raft port) before joining")
        try:
            await store.add_member(info.raft_address, timeout=timeout)
        except StoreUnavailable as exc:
            return _error(503, f"could not add {info.raft_address}: {exc}")
        log.info("added %s (node %s) to the raft group", info.raft_address, info.node_id)
    try:
        await store.register_member(info.to_json(), timeout=timeout)
    except StoreUnavailable as exc:
        log.warning("member %s added but not registered yet: %s", info.raft_address, exc)
    return web.json_response({"admitted": True, "alreadyMember": already, **members_document(store)})


async def _forward_to_leader(request: web.Request, *, store: RaftStore, info: MemberInfo,
                             client_ssl: ssl.SSLContext | None = None) -> web.Response:
    leader = store.leader_address
    url = store.directory.get(leader or "", {}).get("apiUrl")
    if url is None:
        return web.json_response(status_object(503, "no known leader to forward the join to; retry"),
                                 status=503, headers={"Retry-After": "1"})
    headers = {"Authorization": request.headers.get("Authorization", "")}
    try:
        # aiohttp, not exo_ctl.http: node-to-node calls inside the event loop must not block it
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            async with session.post(url + MEMBERS_PATH, json=info.to_json(), headers=headers,
                                    ssl=client_ssl or True) as resp:
                return web.json_response(await resp.json(), status=resp.status)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return _error(503, f"forwarding the join to the leader at {url} failed: {exc}")


# -- the joining side --

async def fetch_members(peers: Sequence[str], *, secret: str, deadline: float) -> dict[str, Any]:
    """The members document from the first peer that answers (retrying until ``deadline``,
    a time.monotonic() value). A 401 is final: the secret is wrong. A peer still starting
    answers an empty member list: asked again, like a peer that does not answer yet."""
    return await _ask(peers, secret=secret, deadline=deadline, method="GET", body=None,
                      ready=lambda payload: bool(isinstance(payload, dict) and payload.get("members")))


async def request_admission(peers: Sequence[str], *, secret: str, info: MemberInfo,
                            deadline: float) -> dict[str, Any]:
    return await _ask(peers, secret=secret, deadline=deadline, method="POST", body=info.to_json())


async def _ask(peers: Sequence[str], *, secret: str, deadline: float, method: str,
               body: dict[str, Any] | None,
               ready: Callable[[Any], bool] = lambda payload: True) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {secret}"}
    last = "no peer answered"
    delay = 0.2
    # aiohttp, not exo_ctl.http: node-to-node calls inside the event loop must not block it
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while True:
            for peer in peers:
                try:
                    # HTTPS first, unverified (a joining node has no cluster CA yet; still never
                    # plaintext on the LAN); a peer that answers plain HTTP (loopback, --tls off) gets it.
                    try:
                        resp = await session.request(method, f"https://{peer}{MEMBERS_PATH}", json=body,
                                                     headers=headers, ssl=False)
                    except aiohttp.ClientSSLError:
                        resp = await session.request(method, f"http://{peer}{MEMBERS_PATH}", json=body, headers=headers)
                    async with resp:
                        payload = await resp.json(content_type=None)
                        if resp.status == 200 and ready(payload):
                            return payload
                        if resp.status == 200:
                            last = f"{peer} reports no raft members yet (still starting?)"
                            continue
                        message = payload.get("message") if isinstance(payload, dict) else payload
                        if resp.status == 401:
                            raise SecretRefused(f"{peer} refused the cluster secret (401): use the secret "
                                            "printed by the cluster's first node")
                        last = f"{peer} answered {resp.status}: {message}"
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    last = f"{peer}: {exc or type(exc).__name__}"
            if time.monotonic() + delay > deadline:
                raise JoinError(f"could not join via --peers {','.join(peers)}: {last}")
            log.info("join: %s; retrying", last)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
