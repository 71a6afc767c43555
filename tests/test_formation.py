"""How a starting node picks its way into a cluster, and what its API port answers meanwhile."""
import asyncio
import socket
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from reconciler.config import ConfigError, NodeConfig
from reconciler.discovery.mdns import cluster_id_from_secret
from reconciler.formation import (FormingListener, announcement_for, candidate_alive, check_interface,
                                  choose_route, discovery_interface)

SELF = "10.0.0.1:52416"


@pytest.mark.parametrize(("saved", "peers", "discovery", "route"), [
    ((SELF, "10.0.0.2:52416"), ("10.0.0.2:52415",), True, "rejoin"),   # saved members win
    ((SELF,), (), False, "rejoin"),
    (("10.0.0.2:52416",), (), True, "discover"),  # a saved list without this node is no membership
    (None, ("10.0.0.2:52415",), True, "peers"),
    (None, ("10.0.0.2:52415",), False, "peers"),
    (None, (), True, "discover"),
    (None, (), False, "new"),
])
def test_saved_members_then_peers_then_discovery_decide_how_a_node_gets_in(saved, peers, discovery, route):
    assert choose_route(saved_members=saved, self_address=SELF, peers=peers, discovery=discovery) == route


def config(**overrides) -> NodeConfig:
    values = dict(name="node-a", data_dir=Path("/nonexistent"), host="127.0.0.1", advertise_host="127.0.0.1",
                  api_port=41000, raft_port=41001, peers=(), secret="s3cret", node_id=str(uuid.uuid4()))
    return NodeConfig(**{**values, **overrides})


def test_a_node_announces_where_it_serves_unless_told_an_interface():
    assert discovery_interface(config(), None) == "127.0.0.1"
    assert discovery_interface(config(host="0.0.0.0", advertise_host="192.168.1.7"), None) == "192.168.1.7"
    assert discovery_interface(config(), "10.1.2.3") == "10.1.2.3"
    # Bound to loopback, it never announces on the address it merely advertises.
    assert discovery_interface(config(advertise_host="192.168.1.7"), None) == "127.0.0.1"


def test_a_wildcard_host_that_advertises_a_name_needs_an_interface():
    with pytest.raises(ConfigError, match=r"^--advertise-host \(where discovery announces by default"):
        discovery_interface(config(host="0.0.0.0", advertise_host="node-a.local"), None)


@pytest.mark.parametrize(("interface", "message"), [
    ("eth0", "--interface: must be an IPv4 address, got 'eth0'"),
    ("0.0.0.0", "--interface: must be a unicast IPv4 address, got '0.0.0.0'"),
])
def test_a_bad_interface_is_a_config_error_naming_the_flag(interface, message):
    with pytest.raises(ConfigError) as error:
        discovery_interface(config(), interface)
    assert str(error.value) == message


def test_an_interface_address_this_machine_does_not_have_is_refused_naming_the_flag():
    check_interface("127.0.0.1", flag_given=True)
    with pytest.raises(ConfigError, match=r"^--interface: cannot announce with mDNS on 192.0.2.1: "):
        check_interface("192.0.2.1", flag_given=True)  # TEST-NET-1: never a local address here


def test_an_advertised_host_name_cannot_be_announced_and_the_error_names_the_flag():
    with pytest.raises(ConfigError, match=r"^--advertise-host: must be an IPv4 address, got 'node-a.local'"):
        announcement_for(config(advertise_host="node-a.local"), version="1", formed=False)


def test_the_announcement_carries_the_cluster_id_never_the_secret():
    node = config()
    announcement = announcement_for(node, version="1.2.3", formed=False)
    assert announcement.cluster_id == cluster_id_from_secret("s3cret")
    assert "s3cret" not in str(announcement.to_txt())
    assert (announcement.node_id, announcement.api_port, announcement.raft_port) == (node.node_id, 41000, 41001)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_while_forming_the_api_port_answers_healthz_and_503_and_checks_the_secret():
    port = free_port()
    listener = FormingListener(host="127.0.0.1", port=port, secret="s3cret")
    await listener.start()
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
            async with session.get("/healthz") as resp:
                assert resp.status == 200
            async with session.get("/readyz") as resp:
                assert resp.status == 503
            async with session.get("/internal/v1/members", headers={"Authorization": "Bearer s3cret"}) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert "forming" in (await resp.json())["message"]
            async with session.get("/internal/v1/members", headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
    finally:
        await listener.close()
    # Closed: the real API can bind the port right away.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


async def test_a_taken_api_port_is_an_error_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"--api-port: cannot listen on 127.0.0.1:{port}"):
            await FormingListener(host="127.0.0.1", port=port, secret="s").start()


async def test_a_candidate_is_alive_while_either_its_api_or_its_raft_port_accepts():
    api, raft = free_port(), free_port()
    candidate = announcement_for(config(api_port=api, raft_port=raft), version="1", formed=True)
    assert not await candidate_alive(candidate)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", raft)
    try:
        assert await candidate_alive(candidate)  # between the forming listener and the real API
    finally:
        server.close()
        await server.wait_closed()


async def test_fetching_members_asks_again_while_the_peer_still_reports_none():
    """A peer whose API answers before its Raft store is up lists no members: the joining node
    waits for it (it used to give up with "the peer reported no raft members")."""
    from aiohttp import web

    from reconciler.membership import MEMBERS_PATH, JoinError, fetch_members

    answers = [{"members": []}, {"members": []}, {"members": [{"raftAddress": "127.0.0.1:1"}]}]
    seen = []

    async def members(request):
        seen.append(request.headers.get("Authorization"))
        return web.json_response(answers[min(len(seen), len(answers)) - 1])

    app = web.Application()
    app.router.add_get(MEMBERS_PATH, members)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        document = await fetch_members([f"127.0.0.1:{port}"], secret="s", deadline=time.monotonic() + 20)
        assert document["members"] == [{"raftAddress": "127.0.0.1:1"}]
        assert len(seen) == 3 and set(seen) == {"Bearer s"}
        answers[:] = [{"members": []}]
        with pytest.raises(JoinError, match="reports no raft members yet"):
            await fetch_members([f"127.0.0.1:{port}"], secret="s", deadline=time.monotonic() + 0.5)
    finally:
        await runner.cleanup()
