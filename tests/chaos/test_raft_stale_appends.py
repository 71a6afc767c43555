"""A stale append_entries (one the leader sent before it learned how far this follower is, as
the chaos run produces dozens of times a minute) must not drop entries the follower already
holds and acknowledged. PySyncObj 0.3.17 deletes everything after ``prevLogIdx`` on every
append, matching or not (syncobj.py l.990-1004, logged as "truncating already-applied log
entries"); PatchedSyncObj answers such a message from its last entry instead."""
from __future__ import annotations

import pytest
from pysyncobj import SyncObj

from reconciler.store.raft_fixes import PatchedSyncObj
from tests.store.test_raft_fixes import leader_among, three_peers, tick


def log_after_a_stale_append(sync_class: type[SyncObj]) -> tuple[int, int, int]:
    """(last log index before, after, commit index before) of a follower fed a stale append."""
    nodes, ledgers = three_peers(sync_class)
    try:
        assert tick(nodes, 15, until=lambda: leader_among(nodes) is not None), "no leader"
        leader = leader_among(nodes)
        ledger = ledgers[nodes.index(leader)]
        for i in range(30):
            ledger.append(f"v{i}")
        follower = next(n for n in nodes if n is not leader)
        target = leader._SyncObj__getCurrentLogIndex()
        assert tick(nodes, 10, until=lambda: follower.raftLastApplied >= target), "no replication"
        before, committed = follower._SyncObj__getCurrentLogIndex(), follower.raftCommitIndex
        prev = before - 10
        prev_entry, entry = follower._SyncObj__getEntries(prev, 2)
        stale = {"type": "append_entries", "term": leader.raftCurrentTerm, "commit_index": leader.raftCommitIndex,
                 "entries": [entry], "prevLogIdx": prev, "prevLogTerm": prev_entry[2]}
        follower._SyncObj__onMessageReceived(follower._SyncObj__raftLeader, stale)
        return before, follower._SyncObj__getCurrentLogIndex(), committed
    finally:
        for node in nodes:
            node.destroy()


def test_a_stale_append_keeps_every_entry_the_follower_holds():
    before, after, committed = log_after_a_stale_append(PatchedSyncObj)
    assert after == before >= committed


@pytest.mark.slow
def test_unpatched_pysyncobj_0_3_17_drops_committed_entries_on_a_stale_append():
    before, after, committed = log_after_a_stale_append(SyncObj)
    assert after < committed <= before
