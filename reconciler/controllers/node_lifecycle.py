"""Node liveness, judged on the Raft leader from lease renewals it observes.

Each node renews a Lease object through the store about once a second. The leader notes, on its
own monotonic clock, when it last saw each lease change (never comparing other machines' wall
clocks). A node whose lease has not changed for ``node_timeout`` gets Ready=False; one silent for
``grace`` is removed from Raft membership, one at a time and only while the survivors keep quorum.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from reconciler.controllers.manager import Controller
from reconciler.server.events import record_event
from reconciler.store.base import Store, StoreError, make_command, utcnow_iso

log = logging.getLogger(__name__)
LEASE = "Lease"


@dataclass(frozen=True)
class Seen:
    marker: str        # the lease's resourceVersion when we last saw it change
    at: float          # our monotonic time of that observation


@dataclass(frozen=True)
class SetCondition:
    node: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class SetRole:
    node: str
    role: str


@dataclass(frozen=True)
class RemoveNode:
    node: str
    raft_address: str
    silent_for: float


@dataclass(frozen=True)
class HealthPlan:
    seen: dict[str, Seen]
    actions: list[Any] = field(default_factory=list)


def ready_condition(node: dict[str, Any]) -> dict[str, Any] | None:
    for condition in (node.get("status") or {}).get("conditions", []):
        if condition.get("type") == "Ready":
            return condition
    return None


def plan_node_health(*, nodes: list[dict[str, Any]], leases: dict[str, dict[str, Any]],
                     seen: dict[str, Seen], now: float, timeout: float, grace: float,
                     leader: str, raft_members: int) -> HealthPlan:
    """Pure: what the leader should change, given what it has observed so far."""
    new_seen: dict[str, Seen] = {}
    actions: list[Any] = []
    silent: dict[str, float] = {}
    for node in nodes:
        name = node["metadata"]["name"]
        lease = leases.get(name)
        marker = lease["metadata"]["resourceVersion"] if lease else ""
        previous = seen.get(name)
        if previous is None or previous.marker != marker:
            # First sight (e.g. just became leader) counts as fresh: a full timeout before judging.
            new_seen[name] = Seen(marker, now)
        else:
            new_seen[name] = previous
        age = now - new_seen[name].at
        silent[name] = age
        fresh = name == leader or age < timeout
        current = ready_condition(node)
        if fresh and (current is None or current.get("status") != "True"):
            actions.append(SetCondition(name, "True", "LeaseRenewed", "node is renewing its lease"))
        elif not fresh and (current is None or current.get("status") != "False"):
            actions.append(SetCondition(name, "False", "NodeLeaseExpired",
                                        f"lease not renewed for {age:.1f}s (timeout {timeout:g}s)"))
        role = "leader" if name == leader else "follower"
        if (node.get("status") or {}).get("role") != role:
            actions.append(SetRole(name, role))
    # At most one removal per pass, and only while the nodes still alive keep a majority of the
    # smaller membership (removing a dead voter never costs the survivors their quorum).
    alive = sum(1 for age in silent.values() if age < timeout)
    for node in sorted(nodes, key=lambda n: -silent[n["metadata"]["name"]]):
        name = node["metadata"]["name"]
        if name == leader or silent[name] < grace:
            continue
        remaining = max(raft_members - 1, 1)
        if alive >= remaining // 2 + 1:
            spec = node.get("spec", {})
            actions.append(RemoveNode(name, f"{spec.get('address')}:{spec.get('raftPort')}", silent[name]))
        break
    return HealthPlan(seen=new_seen, actions=actions)


class NodeLifecycleController(Controller):
    name = "node-lifecycle"
    watches = ("Node", LEASE)
    leader_only = True

    def __init__(self, *, store: Store, node_name: str, timeout: float = 3.0, grace: float = 600.0,
                 remove_member: Callable[[str], Awaitable[None]] | None = None,
                 raft_members: Callable[[], int] | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.store, self.node_name = store, node_name
        self.timeout, self.grace = timeout, grace
        self.remove_member = remove_member
        self.raft_members = raft_members
        self.clock, self.wall_clock = clock, wall_clock
        self.resync_seconds = max(0.2, timeout / 4)  # time passing, not a store change, expires leases
        self._seen: dict[str, Seen] = {}

    @property
    def lease_ages(self) -> dict[str, float]:
        """Seconds since each node's last renewal was seen, as of now (not of the last pass)."""
        now = self.clock()
        return {name: now - seen.at for name, seen in self._seen.items()}

    def stop(self) -> None:
        self._seen = {}  # a later term starts with fresh observations

    async def reconcile(self) -> None:
        nodes, _ = self.store.list("Node")
        leases = {lease["metadata"]["name"]: lease for lease in self.store.list(LEASE)[0]}
        now = self.clock()
        plan = plan_node_health(nodes=nodes, leases=leases, seen=self._seen, now=now, timeout=self.timeout,
                                grace=self.grace, leader=self.node_name,
                                raft_members=self.raft_members() if self.raft_members else len(nodes))
        self._seen = plan.seen
        by_name = {n["metadata"]["name"]: n for n in nodes}
        for action in plan.actions:
            node = by_name[action.node]
            if isinstance(action, RemoveNode):
                await self._remove(action)
                continue
            status = dict(node.get("status") or {})
            if isinstance(action, SetRole):
                status["role"] = action.role
            else:
                log.info("node %s: Ready=%s (%s)", action.node, action.status, action.message)
                if action.status != "True":
                    record_event(self.store, node, reason="NodeNotReady", type_="Warning", message=action.message,
                                 component="node-lifecycle")
                others = [c for c in status.get("conditions", []) if c.get("type") != "Ready"]
                status["conditions"] = others + [{
                    "type": "Ready", "status": action.status, "reason": action.reason,
                    "message": action.message, "lastTransitionTime": utcnow_iso(self.wall_clock)}]
            try:
                await self.store.submit(make_command(
                    "status", ("Node", "", action.node), body={"status": status},
                    expected_rv=node["metadata"]["resourceVersion"]))
            except StoreError as error:
                if error.code not in (404, 409):
                    raise
                return  # the node changed under us; the next pass sees the new version
            node = self.store.get(("Node", "", action.node)) or node
            by_name[action.node] = node

    async def _remove(self, action: RemoveNode) -> None:
        log.warning("node %s silent for %.0fs: removing it from the cluster", action.node, action.silent_for)
        if self.remove_member is not None:
            await self.remove_member(action.raft_address)
        for kind in ("Node", LEASE):
            try:
                await self.store.submit(make_command("delete", (kind, "", action.node)))
            except StoreError as error:
                if error.code != 404:
                    raise
        self._seen.pop(action.node, None)
