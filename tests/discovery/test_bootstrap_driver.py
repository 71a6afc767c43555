"""run_bootstrap driven by a scripted candidate source (no network), in real but short time."""
import asyncio
import time

import pytest

from reconciler.discovery.bootstrap import Bootstrapped, Joined, api_port_open, run_bootstrap
from reconciler.discovery.mdns import Announcement, CandidateEvent, cluster_id_from_secret

CLUSTER = cluster_id_from_secret("ours")
WINDOW = 0.1


def node(n: int, *, formed: bool = False) -> Announcement:
    return Announcement(cluster_id=CLUSTER, node_id=f"00000000-0000-4000-8000-{n:012d}",
                        node_name=f"node-{n}", address="127.0.0.1", api_port=50000 + n,
                        raft_port=51000 + n, version="0.1.0", formed=formed)


class ScriptedSource:
    """The CandidateSource contract, fed by the test."""

    def __init__(self, me: Announcement, *peers: Announcement):
        self.announcement = me
        self._candidates = {p.node_id: p for p in peers}
        self._queues: list[asyncio.Queue[CandidateEvent]] = []
        self.announced: list[Announcement] = []

    def candidates(self):
        return dict(self._candidates)

    def subscribe(self):
        queue = asyncio.Queue()
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue):
        self._queues.remove(queue)

    async def update(self, announcement):
        self.announcement = announcement
        self.announced.append(announcement)

    def see(self, peer: Announcement):
        self._candidates[peer.node_id] = peer
        for queue in self._queues:
            queue.put_nowait(CandidateEvent(kind="seen", announcement=peer))


class Recorder:
    def __init__(self, *, join_results=(True,), alive=True):
        self.calls: list[str] = []
        self._join_results = list(join_results)
        self._alive = alive

    async def bootstrap(self):
        self.calls.append("bootstrap")

    async def join(self, target):
        self.calls.append(f"join {target.node_name}")
        return self._join_results.pop(0) if len(self._join_results) > 1 else self._join_results[0]

    async def probe(self, target):
        self.calls.append(f"probe {target.node_name}")
        return self._alive


async def test_lowest_node_announces_formed_before_it_bootstraps():
    source, rec = ScriptedSource(node(1), node(2)), Recorder()
    order = []

    async def bootstrap():
        order.append(("bootstrap", source.announcement.formed))

    outcome = await run_bootstrap(discovery=source, bootstrap=bootstrap, join=rec.join, probe=rec.probe,
                                  window=WINDOW)
    assert outcome == Bootstrapped()
    assert order == [("bootstrap", True)] and source.announcement.formed


async def test_bootstrap_waits_for_the_discovery_window():
    source, rec = ScriptedSource(node(1)), Recorder()
    started = time.monotonic()
    await run_bootstrap(discovery=source, bootstrap=rec.bootstrap, join=rec.join, probe=rec.probe,
                        window=0.3)
    assert time.monotonic() - started >= 0.3 and rec.calls == ["bootstrap"]


async def test_an_existing_cluster_is_joined_at_once_without_waiting_for_the_window():
    source, rec = ScriptedSource(node(3), node(1, formed=True)), Recorder()
    started = time.monotonic()
    outcome = await run_bootstrap(discovery=source, bootstrap=rec.bootstrap, join=rec.join,
                                  probe=rec.probe, window=5.0)
    assert outcome == Joined(target=node(1, formed=True))
    assert time.monotonic() - started < 1.0 and rec.calls == ["join node-1"]
    assert source.announcement.formed


async def test_a_higher_node_waits_for_the_lowest_and_joins_once_it_has_formed():
    source, rec = ScriptedSource(node(2), node(1)), Recorder()
    task = asyncio.create_task(run_bootstrap(discovery=source, bootstrap=rec.bootstrap, join=rec.join,
                                             probe=rec.probe, window=WINDOW, patience=5.0))
    await asyncio.sleep(0.3)
    assert not task.done() and rec.calls == []
    source.see(node(1, formed=True))
    outcome = await asyncio.wait_for(task, 2)
    assert outcome == Joined(target=node(1, formed=True)) and rec.calls == ["join node-1"]


async def test_an_awaited_node_that_is_down_is_skipped_after_patience_and_the_next_lowest_bootstraps():
    source, rec = ScriptedSource(node(2), node(1), node(3)), Recorder(alive=False)
    outcome = await asyncio.wait_for(run_bootstrap(
        discovery=source, bootstrap=rec.bootstrap, join=rec.join, probe=rec.probe,
        window=WINDOW, patience=0.2), 3)
    assert outcome == Bootstrapped() and rec.calls == ["probe node-1", "bootstrap"]


async def test_an_awaited_node_that_is_alive_keeps_being_waited_for():
    source, rec = ScriptedSource(node(2), node(1)), Recorder(alive=True)
    task = asyncio.create_task(run_bootstrap(discovery=source, bootstrap=rec.bootstrap, join=rec.join,
                                             probe=rec.probe, window=WINDOW, patience=0.1))
    await asyncio.sleep(0.6)
    assert not task.done() and "bootstrap" not in rec.calls and rec.calls.count("probe node-1") >= 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_failed_join_to_a_live_member_is_retried_never_turned_into_a_second_cluster():
    source, rec = ScriptedSource(node(1), node(2, formed=True)), Recorder(join_results=(False, False, True))
    outcome = await asyncio.wait_for(run_bootstrap(
        discovery=source, bootstrap=rec.bootstrap, join=rec.join, probe=rec.probe,
        window=WINDOW, join_retry=0.05), 3)
    assert outcome == Joined(target=node(2, formed=True))
    assert "bootstrap" not in rec.calls and rec.calls.count("join node-2") == 3


async def test_a_failed_join_to_a_dead_member_moves_on_to_another_member():
    source = ScriptedSource(node(5), node(1, formed=True), node(2, formed=True))
    calls = []

    async def join(target):
        calls.append(target.node_name)
        return target.node_name == "node-2"

    async def probe(target):
        return False

    outcome = await asyncio.wait_for(run_bootstrap(discovery=source, bootstrap=Recorder().bootstrap,
                                                   join=join, probe=probe, window=WINDOW), 3)
    assert outcome == Joined(target=node(2, formed=True)) and calls == ["node-1", "node-2"]


async def test_run_bootstrap_leaves_no_subscription_behind():
    source, rec = ScriptedSource(node(1)), Recorder()
    await run_bootstrap(discovery=source, bootstrap=rec.bootstrap, join=rec.join, probe=rec.probe,
                        window=0.0)
    assert source._queues == []


async def test_the_default_probe_finds_a_listening_api_port_alive_and_a_closed_one_down():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    listening = node(1).model_copy(update={"api_port": port})
    assert await api_port_open(listening)
    server.close()
    await server.wait_closed()
    assert not await api_port_open(listening, timeout=0.5)
