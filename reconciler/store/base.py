"""The store interface every node component talks to, and the watch machinery shared by the
Raft-backed store and its in-memory twin."""
from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

from reconciler.store.state import Event, Key, StoreState


class StoreError(Exception):
    """A write failed with an API status (404, 409, ...)."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class StoreUnavailable(Exception):
    """No quorum, or the commit did not complete in time: the outcome of a write is unknown."""


class StoreRefused(StoreUnavailable):
    """Refused before proposing (no quorum, a diverged replica, a full disk): nothing was applied."""


class Gone(Exception):
    """A watch asked for history that has been compacted away (410 Gone): re-list."""


def utcnow_iso(clock: Callable[[], float] | None = None) -> str:
    moment = datetime.fromtimestamp(clock(), timezone.utc) if clock else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_command(op: str, key: Key, *, body: dict[str, Any] | None = None,
                 expected_rv: str | None = None, expected_uid: str | None = None,
                 op_id: str | None = None, now: str | None = None) -> dict[str, Any]:
    kind, namespace, name = key
    command: dict[str, Any] = {
        "op": op, "opId": op_id or uuid.uuid4().hex, "kind": kind, "namespace": namespace,
        "name": name, "now": now or utcnow_iso(), "uid": str(uuid.uuid4()),
    }
    if body is not None:
        command["object"] = body
    if expected_rv is not None:
        command["expectedResourceVersion"] = str(expected_rv)
    if expected_uid is not None:
        command["expectedUid"] = expected_uid
    return command


class Store(ABC):
    """Desired state: writes are proposed and committed (through Raft or in memory), reads and
    watches come from the local replica. All methods run on the asyncio event loop."""

    def __init__(self) -> None:
        self._state = StoreState()
        self._waiter: asyncio.Future[None] | None = None
        self._listeners: list[Callable[[StoreState], None]] = []
        self._epoch = 0  # bumped when the replica is replaced wholesale (a re-sync): watchers re-list
        self.commit_observer: Callable[[float], None] | None = None  # seconds from proposing to applied

    # -- reads (local replica) --
    @property
    def state(self) -> StoreState:
        return self._state

    @property
    def revision(self) -> int:
        return self._state.revision

    def get(self, key: Key) -> dict[str, Any] | None:
        obj = self._state.objects.get(key)
        return dict(obj) if obj is not None else None

    def list(self, kind: str, namespace: str | None = None) -> tuple[list[dict[str, Any]], int]:
        state = self._state
        items = [dict(obj) for (k, ns, _), obj in state.objects.items()
                 if k == kind and (namespace is None or ns == namespace)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return items, state.revision

    async def watch(self, since: int, kind: str | None = None) -> AsyncIterator[Event]:
        """Every committed event (of ``kind``, None: of all) after revision ``since``, in order,
        forever. Raises Gone when ``since`` is older than the kept history of that kind (also
        later, if the watcher falls that far behind)."""
        position, epoch = since, self._epoch
        while True:
            state = self._state
            if self._epoch != epoch:
                raise Gone(f"this replica was re-synced from the leader; re-list (was at {position})")
            if position < (compacted := state.compacted_revision_for(kind)):
                raise Gone(f"too old resource version: {position} ({compacted})")
            events = state.events_after(position, kind)
            if not events:
                await self.changed()
                continue
            for event in events:
                position = event.revision
                yield event

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next committed change."""
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        return asyncio.shield(self._waiter)

    def add_listener(self, callback: Callable[[StoreState], None]) -> Callable[[], None]:
        """Call ``callback(state)`` on the loop after each committed change; returns an unsubscribe."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _publish(self, state: StoreState) -> None:
        """Install a newly committed state (on the event loop) and wake watchers."""
        if state.revision < self._state.revision:
            return
        self._state = state
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for callback in list(self._listeners):
            callback(state)

    def _reset_replica(self) -> None:
        """Forget the local replica (before a re-sync); watchers get Gone and re-list."""
        self._epoch += 1
        self._state = StoreState()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- writes --
    async def submit(self, command: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
        """Commit ``command`` and return its result; raises StoreError for API failures and
        StoreUnavailable when the outcome is unknown."""
        started = time.perf_counter()
        result = await self._commit(command, timeout=timeout)
        if self.commit_observer is not None:
            self.commit_observer(time.perf_counter() - started)
        if not result.get("ok"):
            raise StoreError(result["code"], result["reason"], result["message"])
        return result

    @abstractmethod
    async def _commit(self, command: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        ...

    # -- cluster --
    @property
    @abstractmethod
    def is_leader(self) -> bool: ...

    @property
    @abstractmethod
    def has_quorum(self) -> bool: ...

    def unready_reason(self) -> str | None:
        """Why this node must not serve reads or say it is ready now; None when it may."""
        return None if self.has_quorum else "no quorum: this node's store sees no leader with a majority"

    def cluster_status(self) -> dict[str, Any]:
        return {"leader": self.is_leader, "quorum": self.has_quorum, "revision": self.revision}

    async def close(self) -> None:
        return None
