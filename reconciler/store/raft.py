"""The Raft-backed store: PySyncObj replicates JSON commands folded through the pure ``apply``.

PySyncObj runs in its own thread (autoTick). Everything it learns reaches asyncio through
``loop.call_soon_threadsafe``: committed states (``Store._publish``), the result of each command
this node submitted, and a snapshot of the cluster view (leader, quorum, members) taken on every
tick, so the event loop never reads PySyncObj's internals while its thread mutates them.

Quorum is judged from contact, not from open connections: a leader has it while a majority
answered within ``quorum_contact_timeout``, a follower while its leader spoke that recently. A
node without it, or whose applied index lags the leader's commit index for more than
``max_apply_lag_s``, is unready (``unready_reason``): the API refuses its reads and /readyz is
503. ``PatchedSyncObj`` (raft_fixes.py) fixes PySyncObj 0.3.17's catch-up livelock; snapshots
are versioned JSON (snapshot.py) written without forking.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from reconciler.store.base import Store, StoreRefused, StoreUnavailable
from reconciler.store.consistency import Checkpoints
from reconciler.store.files import check_dump, check_journal, disk_full_reason, remove_raft_files
from reconciler.store import raft_guard
from reconciler.store.raft_fixes import PatchedSyncObj
from reconciler.store.snapshot import state_from_snapshot, state_to_snapshot
from reconciler.store.state import StoreState, apply

log = logging.getLogger(__name__)

JOURNAL_FILE = "raft.journal"
DUMP_FILE = "raft.dump"
MEMBERS_FILE = "raft-members.json"

_FAIL_NAMES = {getattr(FAIL_REASON, n): n.lower() for n in dir(FAIL_REASON) if n.isupper()}


raft_guard.install()  # bounded buffering on the Raft port, before any SyncObj exists


@dataclass(frozen=True)
class RaftSettings:
    """How one node's Raft peer is set up. ``partners`` are the other members' raft addresses."""
    self_address: str
    partners: tuple[str, ...]
    data_dir: Path
    secret: str
    bind_host: str | None = None
    raft_min_timeout: float = 0.4
    raft_max_timeout: float = 1.4
    leader_fallback_timeout: float = 3.0  # an isolated leader steps down after this long
    # Quorum means: a leader heard from a majority (a follower: from its leader) this recently.
    quorum_contact_timeout: float = 2.0
    # A replica that has not applied what the leader had committed this long ago is stale.
    max_apply_lag_s: float = 2.0

    def conf(self, *, on_ready: Callable[[], None] | None = None) -> SyncObjConf:
        if not self.secret:
            raise ValueError("a cluster secret is mandatory: Raft traffic is pickled")
        port = self.self_address.rsplit(":", 1)[1]
        return SyncObjConf(
            password=self.secret,
            appendEntriesUseBatch=False,       # batching makes every write wait ~100 ms
            useFork=False,                     # never fork a node holding a model to compact the log
            dynamicMembershipChange=True,
            journalFile=str(self.data_dir / JOURNAL_FILE),
            fullDumpFile=str(self.data_dir / DUMP_FILE),
            leaderFallbackTimeout=self.leader_fallback_timeout,
            raftMinTimeout=self.raft_min_timeout,
            raftMaxTimeout=self.raft_max_timeout,
            connectionTimeout=max(3.5, self.raft_max_timeout),
            connectionRetryTime=1.0,
            bindAddress=f"{self.bind_host}:{port}" if self.bind_host else None,
            maxBindRetries=1,                   # a taken port is an error, not something to wait out
            onReady=on_ready,
        )


@dataclass(frozen=True)
class ClusterView:
    """What this node's Raft peer believed at its last tick."""
    self_address: str
    leader: str | None = None
    is_leader: bool = False
    quorum: bool = False
    members: tuple[str, ...] = ()
    term: int = 0
    in_sync: bool = True  # caught up once since start, and applied what the leader had committed max_apply_lag_s ago

    def to_json(self) -> dict[str, Any]:
        return {"raftAddress": self.self_address, "leaderAddress": self.leader, "isLeader": self.is_leader,
                "quorum": self.quorum, "members": list(self.members), "term": self.term, "inSync": self.in_sync}


def load_members(data_dir: Path) -> tuple[str, ...] | None:
    """The member list this node saw last (None if it never was a member)."""
    path = data_dir / MEMBERS_FILE
    try:
        members = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable member list ({exc}); remove it to rejoin via --peers") from exc
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ValueError(f"{path}: expected a JSON list of raft addresses")
    return tuple(members)


def save_members(data_dir: Path, members: Sequence[str]) -> None:
    path = data_dir / MEMBERS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(members)))
    os.replace(tmp, path)


class _StateMachine(SyncObjConsumer):
    """The replicated part: the resource state plus a directory of members (raft address →
    node id and API URL) that lets any node find the leader's HTTP API."""

    def __init__(self, on_change: Callable[[StoreState], None]) -> None:
        super().__init__()
        self.state = StoreState()
        self.directory: dict[str, dict[str, str]] = {}
        self.checkpoints = Checkpoints()
        self._on_change = on_change

    @replicated
    def apply_command(self, command_json: str) -> dict[str, Any]:
        state, result = apply(self.state, json.loads(command_json))
        if state is not self.state:
            self.state = state
            self.checkpoints.record(state)
            self._on_change(state)
        return result

    @replicated
    def register_member(self, info_json: str) -> None:
        info = json.loads(info_json)
        directory = dict(self.directory)
        directory[info["raftAddress"]] = {k: str(v) for k, v in info.items() if k != "raftAddress"}
        self.directory = directory

    def _serialize(self) -> str:
        return state_to_snapshot(self.state, self.directory)

    def _deserialize(self, data: str | Mapping[str, Any]) -> None:
        self.state, self.directory = state_from_snapshot(data)
        self._on_change(self.state)


class RaftStore(Store):
    """Store whose writes are committed through PySyncObj. Create it on the event loop; call
    ``await store.close()`` to stop the Raft thread."""

    def __init__(self, settings: RaftSettings, *, admitted: bool = True) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._settings = settings
        self._admitted = admitted
        self._view = ClusterView(self_address=settings.self_address)
        self._view_listeners: list[Callable[[ClusterView], None]] = []
        self._saved_members: tuple[str, ...] = ()
        self._progress = (0, 0, 0)  # (commit index, last applied, leader's commit index), raft thread
        self._catch_up: tuple[float, int] | None = None  # (since, leader commit index to reach)
        self._closed = False
        self._in_flight: set[asyncio.Future[Any]] = set()
        self.diverged: str | None = None   # why this replica disagrees with the majority (until repaired)
        self._resync_to = 0                # a repaired replica is unready until it holds this log index
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        check_raft_files(settings.data_dir)
        self._machine = _StateMachine(self._on_committed_state)
        self._sync = self._start_sync(settings.partners)
        if admitted:
            self._save_members(self._current_members())

    def _start_sync(self, partners: Sequence[str], *, abstain_below: int = 0) -> PatchedSyncObj:
        settings = self._settings
        sync = PatchedSyncObj(settings.self_address, list(partners), conf=settings.conf(), consumers=[self._machine],
                              space_ok=self._space_ok, abstain_below_index=abstain_below)
        sync.addOnTickCallback(self._on_tick)
        try:
            sync.waitBinded()
        except Exception as exc:
            sync.destroy()
            raise OSError(f"cannot listen for Raft on {settings.self_address}: port in use?") from exc
        return sync

    _space_checked = (0.0, True)

    def _space_ok(self) -> bool:
        """Whether the data dir has room for new entries (raft thread; statvfs at most every 0.5 s)."""
        at, ok = self._space_checked
        if (now := time.monotonic()) - at > 0.5:
            ok = disk_full_reason(self._settings.data_dir) is None
            self._space_checked = (now, ok)
        return ok

    # -- raft thread → loop --
    def _on_committed_state(self, state: StoreState) -> None:
        if not self._closed:
            self._loop.call_soon_threadsafe(self._publish, state)

    def _current_members(self) -> tuple[str, ...]:
        others = [n.address for n in self._sync.otherNodes]
        return tuple(sorted([self._settings.self_address, *others]))

    def _heard_from_majority(self, now: float) -> bool:
        sync, fresh = self._sync, self._settings.quorum_contact_timeout
        if sync._isLeader():
            responses = sync._SyncObj__lastResponseTime
            others = sync.otherNodes
            heard = 1 + sum(1 for node in others if responses.get(node, 0.0) > now - fresh)
            return heard > (len(others) + 1) / 2
        return sync._getLeader() is not None and now - sync.leader_contact_at <= fresh

    def _in_sync(self, now: float, applied: int, leader_commit: int) -> bool:
        """False once a leader commit index seen ``max_apply_lag_s`` ago is still not applied."""
        if applied >= leader_commit:
            self._catch_up = None
        elif self._catch_up is None or applied >= self._catch_up[1]:
            self._catch_up = (now, leader_commit)
        return self._catch_up is None or now - self._catch_up[0] <= self._settings.max_apply_lag_s

    def _on_tick(self) -> None:
        sync = self._sync
        leader = sync._getLeader()
        now = time.monotonic()
        applied, leader_commit = sync.raftLastApplied, sync._SyncObj__leaderCommitIndex or 0
        view = ClusterView(
            self_address=self._settings.self_address,
            leader=leader.address if leader is not None else None,
            is_leader=sync._isLeader(),
            quorum=self._heard_from_majority(now),
            members=self._current_members(),
            term=sync.raftCurrentTerm,
            # isReady: applied the leader's commit index once since start, so a restarted node
            # never serves the state it had when it stopped (found by tests/chaos).
            in_sync=self._in_sync(now, applied, leader_commit) and sync.isReady(),
        )
        self._progress = (sync.raftCommitIndex, applied, leader_commit)
        if view != self._view and not self._closed:
            self._view = view  # a single reference swap: readers on the loop see old or new
            self._loop.call_soon_threadsafe(self._view_changed, view)

    def _view_changed(self, view: ClusterView) -> None:
        if not view.quorum:  # answer now rather than at the commit timeout
            for future in [f for f in self._in_flight if not f.done()]:
                future.set_exception(StoreUnavailable("this node lost quorum while the change was committing; "
                                                      "outcome unknown"))
        if self._admitted and view.members != self._saved_members:
            self._save_members(view.members)
        for callback in list(self._view_listeners):
            callback(view)

    def _save_members(self, members: Sequence[str]) -> None:
        self._saved_members = tuple(members)
        try:
            save_members(self._settings.data_dir, members)
        except OSError as exc:
            log.warning("could not save the member list: %s", exc)

    # -- writes --
    def _call(self, method: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Call a replicated method; the future resolves on the loop with its result."""
        future: asyncio.Future[Any] = self._loop.create_future()

        def resolve(result: Any, error: int) -> None:
            if future.done():
                return
            if error == FAIL_REASON.SUCCESS:
                future.set_result(result)
            else:
                reason = _FAIL_NAMES.get(error, str(error))
                future.set_exception(StoreUnavailable(f"raft did not commit the change ({reason}); outcome unknown"))

        def callback(result: Any, error: int) -> None:  # raft thread
            self._loop.call_soon_threadsafe(resolve, result, error)

        if self._closed:
            raise StoreUnavailable("the store is closed")
        method(*args, callback=callback)
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        return future

    async def _await(self, future: asyncio.Future[Any], *, timeout: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"{what} did not commit within {timeout:g}s (no quorum?); outcome unknown") from None

    def write_refusal(self) -> str | None:
        """Why this node refuses writes before proposing them (so nothing is applied); None: it may."""
        if not self._view.quorum:
            return "no quorum: this node sees no leader with a majority"
        if self.diverged is not None:
            return f"this replica diverged from the majority and is re-syncing: {self.diverged}"
        return disk_full_reason(self._settings.data_dir)

    async def _commit(self, command: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        if (refusal := self.write_refusal()) is not None:
            raise StoreRefused(refusal)
        future = self._call(self._machine.apply_command, json.dumps(command, separators=(",", ":")))
        return await self._await(future, timeout=timeout, what="the write")

    async def register_member(self, info: Mapping[str, str], *, timeout: float = 5.0) -> None:
        """Record a member's node id and API URL in the replicated directory."""
        future = self._call(self._machine.register_member, json.dumps(dict(info)))
        await self._await(future, timeout=timeout, what="the member registration")

    async def add_member(self, raft_address: str, *, timeout: float = 5.0) -> None:
        """Add one node to the Raft group (dynamic membership). Callers serialize these: the
        leader refuses a change while the previous one is uncommitted."""
        future = self._call(self._sync.addNodeToCluster, raft_address)
        await self._await(future, timeout=timeout, what=f"adding {raft_address}")

    async def remove_member(self, raft_address: str, *, timeout: float = 5.0) -> None:
        """Remove one (dead) node from the Raft group, so quorum is counted without it."""
        future = self._call(self._sync.removeNodeFromCluster, raft_address)
        await self._await(future, timeout=timeout, what=f"removing {raft_address}")

    def mark_admitted(self) -> None:
        """This node is now a member: keep its member list in the data dir from here on."""
        self._admitted = True
        self._save_members(self._view.members or self._current_members())

    # -- cluster --
    @property
    def view(self) -> ClusterView:
        return self._view

    @property
    def is_leader(self) -> bool:
        return self._view.is_leader

    @property
    def has_quorum(self) -> bool:
        return self._view.quorum

    def unready_reason(self) -> str | None:
        view, (_, applied, leader_commit) = self._view, self._progress
        if self.diverged is not None:
            return f"this replica diverged from the majority and is re-syncing from the leader: {self.diverged}"
        if applied < self._resync_to:
            return (f"this replica is re-syncing from the leader after a divergence: applied index {applied} "
                    f"of {self._resync_to}")
        if not view.quorum:
            return (f"no quorum: this node has not heard from a leader with a majority within "
                    f"{self._settings.quorum_contact_timeout:g}s")
        if not view.in_sync:
            return (f"this replica is behind: applied index {applied}, the leader's commit index {leader_commit}, "
                    f"lagging for more than {self._settings.max_apply_lag_s:g}s")
        return None

    @property
    def leader_address(self) -> str | None:
        return self._view.leader

    @property
    def members(self) -> tuple[str, ...]:
        return self._view.members

    @property
    def self_address(self) -> str:
        return self._settings.self_address

    @property
    def directory(self) -> dict[str, dict[str, str]]:
        return dict(self._machine.directory)

    def add_view_listener(self, callback: Callable[[ClusterView], None]) -> Callable[[], None]:
        self._view_listeners.append(callback)
        return lambda: self._view_listeners.remove(callback) if callback in self._view_listeners else None

    def cluster_status(self) -> dict[str, Any]:
        commit_index, last_applied, leader_commit = self._progress
        return {**super().cluster_status(), **self._view.to_json(),
                "commitIndex": commit_index, "lastApplied": last_applied, "leaderCommitIndex": leader_commit,
                "diverged": self.diverged is not None, "resyncs": self.resyncs}

    # -- replica agreement (reconciler/consistency_check.py compares these) --
    resyncs = 0

    def checkpoint_digests(self) -> dict[int, str]:
        return self._machine.checkpoints.digests()

    async def resync(self, reason: str) -> None:
        """Repair a diverged replica: stop serving, drop the journal and dump, and start again as a
        fresh follower that takes the leader's log or snapshot. It casts no vote until it holds
        the log index committed before (it may have counted toward those commits)."""
        self.diverged = reason
        log.error("replica diverged, re-syncing from the leader: %s", reason)
        for future in [f for f in self._in_flight if not f.done()]:
            future.set_exception(StoreUnavailable("this replica diverged and is re-syncing; outcome unknown"))
        commit_index, _, leader_commit = self._progress
        target = max(commit_index, leader_commit)
        partners = [m for m in (self._view.members or self._settings.partners) if m != self._settings.self_address]
        old = self._sync
        old.destroy()
        await asyncio.get_running_loop().run_in_executor(None, _join_tick_thread, old)
        remove_raft_files(self._settings.data_dir, RAFT_FILES)
        self._machine = _StateMachine(self._on_committed_state)
        self._progress, self._catch_up = (0, 0, 0), None
        self._resync_to = target
        self._reset_replica()
        self._sync = self._start_sync(partners, abstain_below=target)
        self.resyncs += 1
        self.diverged = None
        log.warning("re-syncing: journal and dump dropped; unready until log index %d is applied", target)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sync = self._sync
        sync.destroy()
        await asyncio.get_running_loop().run_in_executor(None, _join_tick_thread, sync)


RAFT_FILES = (JOURNAL_FILE, JOURNAL_FILE + ".meta", DUMP_FILE, DUMP_FILE + ".tmp")


def check_raft_files(data_dir: Path) -> None:
    """Refuse to start on a truncated or corrupt journal or dump (ValueError naming the file)."""
    journal, dump = data_dir / JOURNAL_FILE, data_dir / DUMP_FILE
    if journal.exists():
        check_journal(journal)
    if dump.exists():
        consumer_data = check_dump(dump)
        try:
            state_from_snapshot(consumer_data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{dump}: the state in the Raft snapshot does not load ({exc}); move raft.dump, "
                             f"raft.journal and raft.journal.meta out of {data_dir} and start again to re-sync "
                             "from the peers") from None


def _join_tick_thread(sync: SyncObj, timeout: float = 5.0) -> None:
    thread = getattr(sync, "_SyncObj__thread", None)
    if thread is not None:
        thread.join(timeout)
