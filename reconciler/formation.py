"""How a starting node gets into a Raft cluster: rejoin with its saved member list, join through
``--peers``, find the cluster over mDNS, or bootstrap a new one.

With discovery on (the default) and neither saved members nor ``--peers``, the node announces
itself on one interface (``--interface``, else the address it advertises: a node bound to
127.0.0.1 never multicasts anywhere else) and runs the bootstrap rule of
``reconciler.discovery.bootstrap``: join a formed cluster if one is announced, else after a short
window the lowest node id bootstraps and the others join it. Joining uses the same authenticated
path as ``--peers`` (``fetch_members`` then ``request_admission``), so a 401 is final.

Liveness of a candidate is a TCP connect to its API port *or* its Raft port. While a node
discovers, a small ``FormingListener`` holds its API port (answering 503 "forming"); the Raft
port opens before that listener closes, and stays open while the real API binds, so a live
node is never seen as down in between. Once formed, the node keeps announcing ``formed=True``
with a leader hint, so later nodes join instead of bootstrapping. mDNS never decides liveness.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from pydantic import ValidationError

from exo_ctl.api.status import status_object
from reconciler.config import ConfigError, NodeConfig
from reconciler.discovery.bootstrap import DEFAULT_WINDOW, Bootstrapped, api_port_open, run_bootstrap
from reconciler.discovery.mdns import Announcement, MdnsDiscovery, cluster_id_from_secret, validate_interfaces
from reconciler.membership import JoinError, MemberInfo, SecretRefused, fetch_members, request_admission
from reconciler.reachability import tcp_reachable
from reconciler.store.raft import RaftSettings, RaftStore, load_members

log = logging.getLogger(__name__)

Route = Literal["rejoin", "peers", "discover", "new"]
FETCH_ATTEMPT = 5.0        # seconds one discovered target gets to serve its member list
ADMISSION_ATTEMPT = 15.0   # seconds one admission request may take (leader adds one node at a time)


def choose_route(*, saved_members: tuple[str, ...] | None, self_address: str,
                 peers: tuple[str, ...], discovery: bool) -> Route:
    """Pure: saved members win (a restarted node rejoins with its journal and is never added
    twice), then --peers, then discovery; with neither, the node starts a new cluster alone."""
    if saved_members is not None and self_address in saved_members:
        return "rejoin"
    if peers:
        return "peers"
    return "discover" if discovery else "new"


def discovery_interface(config: NodeConfig, interface: str | None) -> str:
    """Where mDNS may announce: ``--interface``, else where the node serves (``--host``; for a
    wildcard host, the advertised address). A ConfigError names the flag when it is not an IPv4
    unicast address."""
    wildcard = config.host in ("0.0.0.0", "::", "")
    chosen = interface or (config.advertise_host if wildcard else config.host)
    try:
        return validate_interfaces([chosen])[0]
    except ValueError as exc:
        flag = "--interface" if interface else ("--advertise-host" if wildcard else "--host")
        flag += "" if interface else " (where discovery announces by default; or pass --interface)"
        raise ConfigError(f"{flag}: {str(exc).split(': ', 1)[-1]}") from None


def announcement_for(config: NodeConfig, *, version: str, formed: bool) -> Announcement:
    """What this node tells the LAN; others reach it at its advertised address, which mDNS
    carries as an IPv4 address (a ConfigError names --advertise-host otherwise)."""
    try:
        return Announcement(cluster_id=cluster_id_from_secret(config.secret), node_id=config.node_id,
                            node_name=config.name, address=config.advertise_host, api_port=config.api_port,
                            raft_port=config.raft_port, version=version, formed=formed)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = {"address": "--advertise-host", "version": "version"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise ConfigError(f"{field}: {first['msg'].removeprefix('Value error, ')} "
                          "(needed to announce this node with mDNS; --no-discovery turns it off)") from None


def raft_settings(config: NodeConfig, partners: tuple[str, ...]) -> RaftSettings:
    return RaftSettings(self_address=config.raft_address, partners=partners, data_dir=config.data_dir,
                        secret=config.keys.raft_password,
                        bind_host=None if config.host in ("0.0.0.0", "::") else config.host)


def member_info(config: NodeConfig) -> MemberInfo:
    return MemberInfo(config.raft_address, config.node_id, config.api_url)


async def known_partners(config: NodeConfig, *, join_timeout: float) -> tuple[tuple[str, ...], bool]:
    """(raft partners, already a member) from the saved member list or ``--peers``; ((), True)
    when there is neither (a new cluster, or discovery decides)."""
    saved = load_members(config.data_dir)
    route = choose_route(saved_members=saved, self_address=config.raft_address, peers=config.peers,
                         discovery=False)
    if route == "rejoin":
        assert saved is not None
        return saved, True
    if route == "new":
        return (), True
    document = await fetch_members(config.peers, secret=config.keys.member,
                                   deadline=time.monotonic() + join_timeout)
    members = tuple(m["raftAddress"] for m in document.get("members", []))
    if not members:
        raise JoinError(f"--peers {','.join(config.peers)}: the peer reported no raft members")
    return members, config.raft_address in members


@dataclass
class Formation:
    """The node's store, and its running discovery (None with --no-discovery)."""
    store: RaftStore
    discovery: MdnsDiscovery | None


async def form_cluster(config: NodeConfig, *, discovery: bool, interface: str | None, version: str,
                       join_timeout: float, window: float = DEFAULT_WINDOW) -> Formation:
    """Get this node into a cluster by the route ``choose_route`` picks; with discovery on, the
    returned discovery keeps announcing (hand it to ``keep_announcing``)."""
    saved = load_members(config.data_dir)
    route = choose_route(saved_members=saved, self_address=config.raft_address, peers=config.peers,
                         discovery=discovery)
    if route == "discover":
        store, mdns = await discover_and_form(config, interface=interface, version=version, window=window)
        return Formation(store=store, discovery=mdns)
    if discovery:  # a bad interface must fail before this node is added to any cluster
        check_interface(discovery_interface(config, interface), flag_given=interface is not None)
        announcement_for(config, version=version, formed=True)
    store = await _join_known(config, join_timeout=join_timeout)
    if not discovery:
        return Formation(store=store, discovery=None)
    # Announced only once in: a node joining via --peers never looks like a bootstrap candidate.
    try:
        mdns = await _start_discovery(config, interface=interface, version=version, formed=True)
    except BaseException:
        await store.close()
        raise
    return Formation(store=store, discovery=mdns)


def check_interface(address: str, *, flag_given: bool) -> None:
    """The address must belong to this machine (a UDP bind tells, sending nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            flag = "--interface" if flag_given else "--host (or pass --interface)"
            raise ConfigError(f"{flag}: cannot announce with mDNS on {address}: {exc.strerror} "
                              "(it must be an address of this machine; --no-discovery turns mDNS off)") from None


async def _join_known(config: NodeConfig, *, join_timeout: float) -> RaftStore:
    """The store of a node that rejoins, joins via --peers, or starts a new cluster alone."""
    partners, admitted = await known_partners(config, join_timeout=join_timeout)
    return await _start_and_admit(config, partners, admitted=admitted, peers=config.peers,
                                  deadline=time.monotonic() + join_timeout)


async def _start_and_admit(config: NodeConfig, partners: tuple[str, ...], *, admitted: bool,
                           peers: Sequence[str], deadline: float) -> RaftStore:
    """Start this node's Raft peer with ``partners`` first, then, unless it is a member already,
    ask ``peers`` to add it; the peer is closed again when that fails."""
    store = RaftStore(raft_settings(config, partners), admitted=admitted)
    if admitted:
        return store
    try:
        await request_admission(peers, secret=config.keys.member, info=member_info(config), deadline=deadline)
    except BaseException:
        await store.close()
        raise
    store.mark_admitted()
    log.info("admitted to the cluster as %s", config.raft_address)
    return store


async def _start_discovery(config: NodeConfig, *, interface: str | None, version: str,
                           formed: bool) -> MdnsDiscovery:
    address = discovery_interface(config, interface)
    mdns = MdnsDiscovery(announcement=announcement_for(config, version=version, formed=formed),
                         interfaces=[address])
    try:
        await mdns.start()
    except OSError as exc:
        flag = "--interface" if interface else "--host (or pass --interface)"
        raise ConfigError(f"{flag}: cannot announce with mDNS on {address}: {exc.strerror or exc} "
                          "(it must be an address of this machine; --no-discovery turns mDNS off)") from None
    log.info("discovery: announcing on %s as a node of cluster %s", address, mdns.announcement.cluster_id)
    return mdns


async def candidate_alive(candidate: Announcement) -> bool:
    """Liveness probe: the candidate accepts TCP on its API port or its Raft port (one of the
    two is open from the start of discovery on, with no gap)."""
    return (await api_port_open(candidate)
            or await tcp_reachable(candidate.raft_address, timeout=1.0))


async def discover_and_form(config: NodeConfig, *, interface: str | None, version: str,
                            window: float = DEFAULT_WINDOW) -> tuple[RaftStore, MdnsDiscovery]:
    """Announce, then bootstrap or join per the bootstrap rule; the API port answers 503
    (forming) meanwhile. Cancellation (SIGTERM) leaves nothing running."""
    listener = FormingListener(host=config.host, port=config.api_port, secret=config.keys.member)
    await listener.start()
    mdns: MdnsDiscovery | None = None
    joined: list[RaftStore] = []

    async def bootstrap() -> None:
        joined.append(RaftStore(raft_settings(config, ()), admitted=True))

    async def join(target: Announcement) -> bool:
        store = await join_via(config, target)
        if store is None:
            return False
        joined.append(store)
        return True

    try:
        mdns = await _start_discovery(config, interface=interface, version=version, formed=False)
        outcome = await run_bootstrap(discovery=mdns, bootstrap=bootstrap, join=join,
                                      probe=candidate_alive, window=window)
        if isinstance(outcome, Bootstrapped):
            log.info("discovery: bootstrapped a new cluster")
        else:
            log.info("discovery: joined the cluster via %s (%s)", outcome.target.node_name,
                     outcome.target.api_address)
        return joined[0], mdns
    except BaseException:
        if mdns is not None:
            await mdns.stop()
        for store in joined:
            await store.close()
        raise
    finally:
        await listener.close()


async def join_via(config: NodeConfig, target: Announcement) -> RaftStore | None:
    """Join through a discovered member, the --peers way: learn the members, start this node's
    Raft peer first, then ask to be added. None on a transient failure (the caller retries);
    SecretRefused (a 401) is final."""
    peers = [target.api_address]
    try:
        document = await fetch_members(peers, secret=config.keys.member, deadline=time.monotonic() + FETCH_ATTEMPT)
    except SecretRefused:
        raise
    except JoinError as exc:
        log.info("discovery: %s is not serving its member list yet: %s", target.node_name, exc)
        return None
    members = tuple(m["raftAddress"] for m in document.get("members", []))
    if not members:
        return None
    try:
        return await _start_and_admit(config, members, admitted=config.raft_address in members, peers=peers,
                                      deadline=time.monotonic() + ADMISSION_ATTEMPT)
    except SecretRefused:
        raise
    except JoinError as exc:
        log.info("discovery: admission via %s failed, will retry: %s", target.node_name, exc)
        return None


async def keep_announcing(mdns: MdnsDiscovery, store: RaftStore) -> None:
    """Announce ``formed=True`` and whether this node leads, whenever the Raft view changes;
    stops discovery (with a goodbye) when cancelled."""
    changed = asyncio.Event()
    remove = store.add_view_listener(lambda view: changed.set())
    try:
        while True:
            changed.clear()
            wanted = mdns.announcement.model_copy(update={"formed": True, "leader": store.is_leader})
            if wanted != mdns.announcement:
                await mdns.update(wanted)
            await changed.wait()
    finally:
        remove()
        await mdns.stop()


READMIT_AFTER_S = 5.0  # a rejoined node without quorum this long asks whether it is still a member


async def readmit_if_removed(config: NodeConfig, store: RaftStore, *, after: float = READMIT_AFTER_S,
                             every: float = 2.0) -> None:
    """A node that rejoined with its saved member list may have been removed meanwhile (silent
    past ``--node-grace``): the others then ignore it. Once it has gone ``after`` seconds without
    quorum, ask the members it knows (their API URLs from the replicated directory) and, if it is
    not among the members they report, ask to be admitted again, the ``--peers`` way."""
    silent_since: float | None = None
    while True:
        await asyncio.sleep(every)
        if store.has_quorum:
            silent_since = None
            continue
        silent_since = silent_since or time.monotonic()
        if time.monotonic() - silent_since < after:
            continue
        peers = [url.split("://", 1)[-1] for address, info in store.directory.items()
                 if address != config.raft_address and (url := info.get("apiUrl"))]
        peers += [peer for peer in config.peers if peer not in peers]
        if not peers:
            continue
        try:
            document = await fetch_members(peers, secret=config.keys.member, deadline=time.monotonic() + every)
            if config.raft_address in {m["raftAddress"] for m in document.get("members", [])}:
                continue
            log.warning("this node was removed from the raft group while away; asking to be admitted again")
            await request_admission(peers, secret=config.keys.member, info=member_info(config),
                                    deadline=time.monotonic() + ADMISSION_ATTEMPT)
            log.info("admitted to the cluster again as %s", config.raft_address)
            silent_since = None
        except SecretRefused:
            raise
        except JoinError as exc:
            log.info("re-admission: %s; retrying", exc)


class FormingListener:
    """Holds the API port while the node looks for its cluster: ``/healthz`` answers 200, every
    other path 503 "forming" (401 for a wrong token on the members path, as the real API would)."""

    def __init__(self, *, host: str, port: int, secret: str) -> None:
        self.host, self.port, self._secret = host, port, secret
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"--api-port: cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self._runner = runner

    async def _answer(self, request: web.Request) -> web.Response:
        if request.path == "/healthz":
            return web.Response(text="ok")
        if request.path.startswith("/internal/"):
            header = request.headers.get("Authorization", "")
            if not hmac.compare_digest(header.encode(), f"Bearer {self._secret}".encode()):
                return web.json_response(status_object(401, "missing or wrong bearer token"), status=401)
        return web.json_response(status_object(503, "this node is forming or joining its cluster; retry"),
                                 status=503, headers={"Retry-After": "1"})

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
