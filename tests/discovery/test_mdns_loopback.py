"""Real python-zeroconf on 127.0.0.1: several MdnsDiscovery instances in one process."""
import asyncio
import socket
import uuid

import pytest

from reconciler.discovery.bootstrap import Bootstrapped, Joined, run_bootstrap
from reconciler.discovery.mdns import (
    IP_MULTICAST_ALL, Announcement, MdnsDiscovery, cluster_id_from_secret,
)

LOOPBACK = "127.0.0.1"


def announcement(cluster_id: str, n: int, **overrides) -> Announcement:
    values = dict(cluster_id=cluster_id, node_id=str(uuid.uuid4()), node_name=f"node-{n}",
                  address=LOOPBACK, api_port=42000 + n, raft_port=43000 + n, version="0.1.0")
    return Announcement(**{**values, **overrides})


@pytest.fixture
def cluster_id() -> str:
    return cluster_id_from_secret(uuid.uuid4().hex)  # never shared with a parallel run


@pytest.fixture
async def start():
    """start(announcement, **kwargs) -> a running MdnsDiscovery, stopped after the test."""
    running: list[MdnsDiscovery] = []

    async def _start(announcement: Announcement, **kwargs) -> MdnsDiscovery:
        discovery = MdnsDiscovery(announcement=announcement, interfaces=[LOOPBACK], **kwargs)
        running.append(discovery)
        await discovery.start()
        return discovery

    yield _start
    await asyncio.gather(*(d.stop() for d in running))


async def eventually(predicate, *, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.05)


async def test_three_nodes_on_loopback_each_see_the_other_two(start, cluster_id):
    nodes = [await start(announcement(cluster_id, n)) for n in range(3)]
    await eventually(lambda: all(len(d.candidates()) == 2 for d in nodes))
    for d in nodes:
        others = {o.announcement.node_id: o.announcement for o in nodes if o is not d}
        assert d.candidates() == others


async def test_nodes_of_another_cluster_are_ignored(start, cluster_id):
    other = cluster_id_from_secret(uuid.uuid4().hex)
    ours = [await start(announcement(cluster_id, n)) for n in range(2)]
    theirs = [await start(announcement(other, n)) for n in range(2, 4)]
    # Both pairs have found each other, so every announcement has been on the wire.
    await eventually(lambda: all(len(d.candidates()) == 1 for d in ours + theirs))
    await asyncio.sleep(0.3)
    assert {a.cluster_id for d in ours for a in d.candidates().values()} == {cluster_id}
    assert {a.cluster_id for d in theirs for a in d.candidates().values()} == {other}


async def test_discovery_sends_only_from_the_given_address_and_hears_only_groups_it_joined(start, cluster_id):
    discovery = await start(announcement(cluster_id, 0))
    engine = discovery.zeroconf.engine
    assert engine.senders, "zeroconf has no sender"
    for sender in engine.senders:
        assert sender.sock.family == socket.AF_INET
        assert sender.sock.getsockname() == (LOOPBACK, 5353)
        multicast_if = sender.sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)
        assert socket.inet_ntoa(multicast_if) == LOOPBACK
    senders = {s.sock for s in engine.senders}
    listeners = [r.sock for r in engine.readers if r.sock not in senders]
    assert listeners and all(
        s.getsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL) == 0 for s in listeners)


async def test_a_changed_announcement_reaches_the_others_as_a_seen_event(start, cluster_id):
    a = await start(announcement(cluster_id, 0))
    b = await start(announcement(cluster_id, 1))
    await eventually(lambda: len(b.candidates()) == 1)
    events = b.subscribe()
    await a.update(a.announcement.model_copy(update={"formed": True, "leader": True}))
    event = await asyncio.wait_for(events.get(), 5)
    assert event.kind == "seen" and event.announcement.formed and event.announcement.leader
    assert b.candidates()[a.announcement.node_id].formed


async def test_a_node_that_stops_says_goodbye_and_leaves_the_candidates(start, cluster_id):
    a = await start(announcement(cluster_id, 0))
    b = await start(announcement(cluster_id, 1))
    await eventually(lambda: len(b.candidates()) == 1)
    events = b.subscribe()
    await a.stop()
    event = await asyncio.wait_for(events.get(), 5)
    assert (event.kind, event.announcement.node_id) == ("gone", a.announcement.node_id)
    assert b.candidates() == {}


async def test_a_restarted_node_is_seen_again_quickly_with_its_new_ports(start, cluster_id):
    first = announcement(cluster_id, 0)
    a = await start(first)
    b = await start(announcement(cluster_id, 1))
    await eventually(lambda: len(b.candidates()) == 1)
    await a.stop()
    await eventually(lambda: b.candidates() == {})
    restarted = first.model_copy(update={"api_port": 44000})
    a2 = await start(restarted)
    await eventually(lambda: b.candidates().get(first.node_id) == restarted, timeout=3)
    await eventually(lambda: len(a2.candidates()) == 1, timeout=3)


async def test_the_on_candidate_callback_runs_for_each_new_candidate(start, cluster_id):
    seen = asyncio.Queue()

    async def on_candidate(candidate):
        await seen.put(candidate.node_name)

    await start(announcement(cluster_id, 0), on_candidate=on_candidate)
    await start(announcement(cluster_id, 1))
    assert await asyncio.wait_for(seen.get(), 5) == "node-1"


async def test_three_nodes_started_together_form_exactly_one_cluster(start, cluster_id):
    nodes = [await start(announcement(cluster_id, n)) for n in range(3)]
    bootstrapped: list[str] = []

    def drive(discovery: MdnsDiscovery):
        async def bootstrap():
            bootstrapped.append(discovery.announcement.node_id)

        async def join(target):
            return target.formed  # a formed member accepts the join

        async def alive(candidate):
            return True

        return run_bootstrap(discovery=discovery, bootstrap=bootstrap, join=join, probe=alive, window=1.0)

    outcomes = await asyncio.wait_for(asyncio.gather(*(drive(d) for d in nodes)), 10)
    lowest = min(d.announcement.node_id for d in nodes)
    assert bootstrapped == [lowest]
    assert sorted(type(o).__name__ for o in outcomes) == ["Bootstrapped", "Joined", "Joined"]
    assert all(o.target.node_id == lowest for o in outcomes if isinstance(o, Joined))
    assert sum(isinstance(o, Bootstrapped) for o in outcomes) == 1
    assert all(d.announcement.formed for d in nodes)


async def test_starting_twice_is_refused(start, cluster_id):
    discovery = await start(announcement(cluster_id, 0))
    with pytest.raises(RuntimeError, match="already started"):
        await discovery.start()
