"""``PatchedSyncObj``: PySyncObj's ``SyncObj`` with a fix for a catch-up livelock in 0.3.17.

The upstream bug (pysyncobj/syncobj.py 0.3.17, ``__onMessageReceived`` / ``__sendAppendEntries``):

- a follower that finds a *term mismatch* at ``prevLogIdx`` answers ``next_node_idx=prevLogIdx``
  with ``reset=True`` but keeps its conflicting entry (l.986-988);
- a follower that *lacks* ``prevLogIdx`` answers "my last index + 1" (l.984-985, l.1100), which
  still counts those conflicting entries;
- the leader sends every batch up to its last index in one go, moving its next index past each
  batch before any reply (l.1267-1273), and takes any reset reply as it is, even one that raises
  the next index again (l.1077-1078).

So a node that wrote uncommitted entries as a leader, was cut off, and comes back after the
majority wrote more than one 64 KiB append batch never catches up: per round, the first batch's
reply walks the index back by one, the later batches' replies set it back to "my last + 1", and
the walk-back never gets below the conflict. Raft (§5.3) says a follower deletes a conflicting
entry and all that follow it; this class does that before upstream's handler runs, so the next
"my last + 1" reply already lies below the conflict and the leader's walk-back converges.

Entries at or below this node's commit index are never deleted (a committed entry never
conflicts in a correct cluster: upstream's handler logs that case as critical). Membership-change
entries among the deleted ones are undone, as upstream does for a conflict it detects.

Stale appends: upstream deletes every entry after ``prevLogIdx`` on each append_entries, even
when the entries match (l.990-1004), so an append the leader sent before learning how far a
follower is drops entries that follower acknowledged ("truncating already-applied log entries",
dozens a minute under tests/chaos). Such a message is answered from the follower's last entry.

Leader stickiness (Raft thesis §4.2.3), which 0.3.17 lacks: a follower that heard from its
leader within the minimum election timeout ignores vote requests. Without it, a node cut off
from the leader only (one dropped link) keeps winning the third node's vote at ever higher terms
and the cluster changes leader every election timeout. (A leader still steps down for a higher
term, so a node that comes back with a higher term is re-admitted after one election.)

It also records when this node last heard from a leader (``leader_contact_at``): a follower
uses it to judge whether its leader still speaks for a majority.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pysyncobj import SyncObj

log = logging.getLogger(__name__)

# Private members of SyncObj 0.3.17 this fix relies on; checked at import so an upgrade that
# renames them fails loudly instead of silently dropping the fix.
_PRIVATE = ("_SyncObj__onMessageReceived", "_SyncObj__getEntries", "_SyncObj__deleteEntriesFrom",
            "_SyncObj__parseChangeClusterRequest", "_SyncObj__doChangeCluster", "_SyncObj__getCurrentLogIndex")
_missing = [name for name in _PRIVATE if not hasattr(SyncObj, name)]
if _missing:
    raise ImportError(f"pysyncobj changed: SyncObj lacks {_missing}; review reconciler/store/raft_fixes.py")


class PatchedSyncObj(SyncObj):
    """SyncObj that deletes a conflicting log suffix as Raft requires (see the module doc)."""

    def __init__(self, *args: Any, space_ok: Callable[[], bool] = lambda: True, abstain_below_index: int = 0,
                 **kwargs: Any) -> None:
        # Set before SyncObj.__init__, which marks the attributes it has by then as not part of a dump.
        self.leader_contact_at = 0.0  # monotonic time of the last append_entries from a current leader
        self.abstain_below_index = abstain_below_index  # a re-synced replica votes only from this log index on
        self.space_ok = space_ok      # False while the data dir is too full to take new entries
        super().__init__(*args, **kwargs)

    def _SyncObj__onMessageReceived(self, node: Any, message: dict[str, Any]) -> None:
        if isinstance(message, dict) and message.get("type") == "request_vote" and (
                self._leader_is_fresh() or self.raftLastApplied < self.abstain_below_index):
            return
        if isinstance(message, dict) and self._refuses_for_space(message):
            return
        is_append = (isinstance(message, dict) and message.get("type") == "append_entries"
                     and message.get("term", -1) >= self.raftCurrentTerm)
        if is_append and "prevLogIdx" in message and message.get("transmission") is None:
            message = self._answered_from_last_entry(message)
        if is_append and "prevLogIdx" in message and message.get("transmission") in (None, "finish"):
            self._delete_conflicting_suffix(message["prevLogIdx"], message["prevLogTerm"])
        SyncObj._SyncObj__onMessageReceived(self, node, message)
        if is_append:
            self.leader_contact_at = time.monotonic()

    def _refuses_for_space(self, message: dict[str, Any]) -> bool:
        """On a full disk, take no new entries (unacknowledged, the leader resends them later) and
        no forwarded commands: an mmap'ed journal page that cannot be backed would kill the process."""
        if message.get("type") == "apply_command" or (message.get("type") == "append_entries"
                                                       and (message.get("entries") or message.get("serialized"))):
            return not self.space_ok()
        return False

    def _leader_is_fresh(self) -> bool:
        return (not self._isLeader() and self._getLeader() is not None
                and time.monotonic() - self.leader_contact_at < self._SyncObj__conf.raftMinTimeout)

    def _answered_from_last_entry(self, message: dict[str, Any]) -> dict[str, Any]:
        """Upstream deletes every entry after ``prevLogIdx`` on each append, even those this node
        holds already with the same terms (it may have acknowledged and applied them). Raft
        deletes only from a conflict: a message whose entries match this log is rewritten to
        start at this node's last entry (carrying only what is new), or, when it ends inside
        this log and the last entry is of the sender's term (so the whole log is the leader's
        prefix, by log matching), to a bare heartbeat from that entry."""
        prev, entries = message["prevLogIdx"], message.get("entries") or []
        last_index = self._SyncObj__getCurrentLogIndex()
        if last_index <= prev:
            return message
        local = self._SyncObj__getEntries(prev, len(entries) + 1)
        if not local or local[0][2] != message["prevLogTerm"]:
            return message
        held = local[1:]
        if any(mine[2] != theirs[2] for mine, theirs in zip(held, entries)):
            return message  # a real conflict: deleted from there on, as Raft says
        last_term = self._SyncObj__getEntries(last_index, 1)[0][2]
        if len(entries) > last_index - prev:
            return {**message, "prevLogIdx": last_index, "prevLogTerm": last_term,
                    "entries": entries[last_index - prev:]}
        if last_term == message["term"]:
            return {**message, "prevLogIdx": last_index, "prevLogTerm": last_term, "entries": []}
        return message

    def _delete_conflicting_suffix(self, prev_index: int, prev_term: int) -> None:
        entries = self._SyncObj__getEntries(prev_index)
        if not entries or entries[0][2] == prev_term or prev_index <= self.raftCommitIndex:
            return
        if self._SyncObj__conf.dynamicMembershipChange:
            for entry in reversed(entries):
                change = self._SyncObj__parseChangeClusterRequest(entry[0])
                if change is not None:
                    self._SyncObj__doChangeCluster(change, reverse=True)
        log.warning("raft: deleting %d conflicting uncommitted log entries from index %d (term %d here, "
                    "%d at the leader)", len(entries), prev_index, entries[0][2], prev_term)
        self._SyncObj__deleteEntriesFrom(prev_index)
