"""PatchedSyncObj against the PySyncObj 0.3.17 catch-up livelock, with real SyncObj peers on
loopback ticked by hand. A cut is a transport that drops every message to or from the cut node
while its TCP connections stay up (a silent link, as when a cable is pulled)."""
from __future__ import annotations

import time
from importlib.metadata import version

import pytest
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.transport import TCPTransport

from reconciler.store.raft_fixes import PatchedSyncObj
from tests.store.test_raft_store import free_ports

CUT: set[str] = set()  # raft addresses whose traffic is dropped
CUT_LINKS: set[frozenset[str]] = set()  # pairs of raft addresses that cannot reach each other
BIG = "x" * 8_000      # 40 of these span five 64 KiB append batches


def is_cut(a: str, b: str) -> bool:
    return a in CUT or b in CUT or frozenset((a, b)) in CUT_LINKS


class CuttableTransport(TCPTransport):
    def send(self, node, message):
        if is_cut(self._selfNode.address, node.address):
            return True  # silently lost, as on a dead link
        return super().send(node, message)

    def _onMessageReceived(self, node, message):
        if not is_cut(self._selfNode.address, node.address):
            super()._onMessageReceived(node, message)


class Ledger(SyncObjConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.values: list[str] = []

    @replicated
    def append(self, value: str) -> None:
        self.values = [*self.values, value]


def tick(nodes, seconds: float, until=lambda: False) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for node in nodes:
            node.doTick(0.002)
        if until():
            return True
    return until()


def leader_among(nodes):
    return next((n for n in nodes if n._isLeader()), None)


def three_peers(sync_class: type[SyncObj]) -> tuple[list[SyncObj], list[Ledger]]:
    addresses = [f"127.0.0.1:{p}" for p in free_ports(3)]
    ledgers = [Ledger() for _ in addresses]
    conf = dict(autoTick=False, appendEntriesUseBatch=False, dynamicMembershipChange=True,
                raftMinTimeout=0.4, raftMaxTimeout=0.8, leaderFallbackTimeout=1.0, connectionTimeout=30.0,
                connectionRetryTime=0.5)
    nodes = [sync_class(a, [b for b in addresses if b != a], conf=SyncObjConf(**conf), consumers=[ledger],
                        transportClass=CuttableTransport) for a, ledger in zip(addresses, ledgers)]
    CUT.clear()
    CUT_LINKS.clear()
    return nodes, ledgers


def diverge_and_heal(sync_class: type[SyncObj]) -> tuple[bool, list[Ledger]]:
    """Cut the leader right after it wrote 3 uncommitted entries, let the majority commit 40
    big ones, heal; True if the old leader then holds exactly what the others hold."""
    nodes, ledgers = three_peers(sync_class)
    try:
        assert tick(nodes, 15, until=lambda: leader_among(nodes) is not None), "no leader"
        old = leader_among(nodes)
        ledger = ledgers[nodes.index(old)]
        for i in range(3):
            ledger.append(f"committed-{i}")
        assert tick(nodes, 5, until=lambda: all(len(l.values) == 3 for l in ledgers)), "no commits"
        CUT.add(old.selfNode.address)
        for i in range(3):
            ledger.append(f"uncommitted-{i}")
        uncommitted = lambda: old._SyncObj__getCurrentLogIndex() - old.raftCommitIndex >= 3  # noqa: E731
        assert tick([old], 0.5, until=uncommitted), "the old leader did not log its 3 entries"
        rest = [n for n in nodes if n is not old]
        assert tick(rest, 10, until=lambda: leader_among(rest) is not None), "the majority elected no leader"
        new_ledger = ledgers[nodes.index(leader_among(rest))]
        for i in range(40):
            new_ledger.append(f"{BIG}-{i}")
        majority = [ledgers[nodes.index(n)] for n in rest]
        assert tick(nodes, 10, until=lambda: all(len(l.values) == 43 for l in majority)), "majority stuck"
        CUT.clear()
        caught_up = tick(nodes, 10, until=lambda: ledger.values == majority[0].values == majority[1].values)
        return caught_up, ledgers
    finally:
        CUT.clear()
        for node in nodes:
            node.destroy()


def test_a_cut_off_leader_with_an_uncommitted_tail_catches_up_across_many_batches():
    caught_up, ledgers = diverge_and_heal(PatchedSyncObj)
    assert caught_up, [len(l.values) for l in ledgers]
    assert not any(v.startswith("uncommitted") for v in ledgers[0].values + ledgers[1].values + ledgers[2].values)


@pytest.mark.skipif(version("pysyncobj") != "0.3.17", reason="checks the upstream 0.3.17 behaviour only")
def test_unpatched_pysyncobj_0_3_17_never_catches_up_in_the_same_scenario():
    # Proves the scenario above exercises the bug; when this fails, upstream fixed it.
    caught_up, ledgers = diverge_and_heal(SyncObj)
    assert not caught_up, [len(l.values) for l in ledgers]


def leader_terms_with_one_link_dropped(sync_class: type[SyncObj]) -> set[int]:
    """Drop the link between the leader and one follower for 4 s; the terms the others' leaders had."""
    nodes, _ = three_peers(sync_class)
    try:
        assert tick(nodes, 15, until=lambda: leader_among(nodes) is not None), "no leader"
        leader = leader_among(nodes)
        follower = next(n for n in nodes if n is not leader)
        CUT_LINKS.add(frozenset((leader.selfNode.address, follower.selfNode.address)))
        terms = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            tick(nodes, 0.05)
            terms |= {n.raftCurrentTerm for n in nodes if n._isLeader() and n is not follower}
        return terms
    finally:
        CUT_LINKS.clear()
        for node in nodes:
            node.destroy()


def test_a_node_cut_off_from_the_leader_only_cannot_depose_it():
    assert len(leader_terms_with_one_link_dropped(PatchedSyncObj)) == 1


@pytest.mark.skipif(version("pysyncobj") != "0.3.17", reason="checks the upstream 0.3.17 behaviour only")
def test_unpatched_pysyncobj_0_3_17_changes_leader_again_and_again_with_one_link_dropped():
    assert len(leader_terms_with_one_link_dropped(SyncObj)) > 1
