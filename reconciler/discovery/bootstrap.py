"""First start without a peer list: nodes that start together must end as ONE cluster.

The rule, as a pure function of what a node has seen (``decide``):
1. A candidate that is already a member of a formed cluster -> join it (prefer one that hints it
   is the Raft leader, then the lowest node id), even while the discovery window is open.
2. Otherwise wait until the discovery window (default 2 s after start) has passed.
3. Then the node with the lowest node id among itself and its candidates bootstraps; the others
   wait for it to announce ``formed`` and join it (rule 1).

``run_bootstrap`` drives the rule with real discovery events and time. It announces ``formed``
*before* bootstrapping, so a node that starts a moment later joins instead of bootstrapping too.
A candidate is only skipped when a liveness probe says it is down: mDNS keeps showing a dead
node for ~19 minutes, and skipping a live one would split the cluster.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from reconciler.discovery.mdns import Announcement, CandidateEvent
from reconciler.reachability import tcp_reachable

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 2.0


class Wait(BaseModel):
    """Nothing to do yet. Decide again on news, or at ``until`` (monotonic seconds) if given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    until: float | None = None
    awaiting: str | None = None  # node id expected to form the cluster
    reason: str


class Bootstrap(BaseModel):
    """Create a new single-member cluster; the others will join it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str


class Join(BaseModel):
    """Ask ``target`` (a member of a formed cluster) to add this node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: Announcement
    reason: str


Decision = Wait | Bootstrap | Join


def decide(self_announcement: Announcement, candidates: Mapping[str, Announcement], *,
           now: float, started_at: float, window: float = DEFAULT_WINDOW,
           unreachable: frozenset[str] = frozenset()) -> Decision:
    """What a node that is not yet in a cluster should do, given the candidates it has seen.

    ``unreachable`` holds node ids a liveness probe found down; they are left out entirely."""
    if self_announcement.formed:
        raise ValueError("decide: this node already belongs to a formed cluster; nothing to bootstrap")
    peers = [c for c in candidates.values()
             if c.cluster_id == self_announcement.cluster_id
             and c.node_id != self_announcement.node_id and c.node_id not in unreachable]
    formed = [c for c in peers if c.formed]
    if formed:
        target = min(formed, key=lambda c: (not c.leader, c.node_id))
        hint = "the leader" if target.leader else "the lowest id of the formed members"
        return Join(target=target, reason=f"cluster exists: join via {target.node_name} ({hint})")
    deadline = started_at + window
    if now < deadline:
        return Wait(until=deadline, reason=f"discovery window open for {deadline - now:.1f}s more, "
                                           f"{len(peers)} candidate(s) so far")
    lowest = min([self_announcement, *peers], key=lambda c: c.node_id)
    if lowest.node_id == self_announcement.node_id:
        return Bootstrap(reason=f"lowest node id among {len(peers) + 1} node(s) and no cluster exists")
    return Wait(awaiting=lowest.node_id,
                reason=f"waiting for {lowest.node_name} ({lowest.node_id}), the lowest node id, "
                       f"to form the cluster")


class Bootstrapped(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Joined(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: Announcement


Outcome = Bootstrapped | Joined


class CandidateSource(Protocol):
    """What ``run_bootstrap`` needs from discovery; MdnsDiscovery is one."""

    @property
    def announcement(self) -> Announcement: ...

    def candidates(self) -> dict[str, Announcement]: ...

    def subscribe(self) -> asyncio.Queue[CandidateEvent]: ...

    def unsubscribe(self, queue: asyncio.Queue[CandidateEvent]) -> None: ...

    async def update(self, announcement: Announcement) -> None: ...


async def api_port_open(candidate: Announcement, *, timeout: float = 1.0) -> bool:
    """Liveness probe: does the candidate accept TCP connections on its API port?"""
    return await tcp_reachable(candidate.api_address, timeout=timeout)


async def run_bootstrap(*, discovery: CandidateSource,
                        bootstrap: Callable[[], Awaitable[None]],
                        join: Callable[[Announcement], Awaitable[bool]],
                        probe: Callable[[Announcement], Awaitable[bool]] = api_port_open,
                        window: float = DEFAULT_WINDOW, patience: float = 5.0,
                        join_retry: float = 0.5, forget_unreachable_after: float = 30.0,
                        clock: Callable[[], float] = time.monotonic) -> Outcome:
    """Wait, bootstrap or join until this node is in a cluster; returns how it got there.

    ``bootstrap()`` creates the single-member cluster. ``join(target)`` asks ``target`` (via its
    ``api_address``) to add this node: True when added, False on a transient failure (retried);
    raise for a permanent one (e.g. a 403 for a wrong secret), which ends ``run_bootstrap``.
    ``probe(candidate)`` says whether a candidate is alive: the node must serve its API while
    discovering. ``discovery.announcement`` is updated to ``formed=True`` on success."""
    started_at = clock()
    queue = discovery.subscribe()
    down: dict[str, float] = {}  # node id -> when a probe found it down
    awaiting: tuple[str, float] | None = None  # (node id, since)
    try:
        while True:
            now = clock()
            down = {node: at for node, at in down.items() if now - at < forget_unreachable_after}
            decision = decide(discovery.announcement, discovery.candidates(), now=now,
                              started_at=started_at, window=window, unreachable=frozenset(down))
            if isinstance(decision, Bootstrap):
                log.info("bootstrap: %s", decision.reason)
                await _announce_formed(discovery)
                await bootstrap()
                return Bootstrapped()
            if isinstance(decision, Join):
                target = decision.target
                log.info("bootstrap: %s", decision.reason)
                if await join(target):
                    await _announce_formed(discovery)
                    return Joined(target=target)
                if not await probe(target):
                    log.warning("bootstrap: %s (%s) is down; leaving it out", target.node_name,
                                target.api_address)
                    down[target.node_id] = clock()
                    continue
                await _next_event(queue, join_retry)
                continue
            timeout = None if decision.until is None else max(0.0, decision.until - now)
            if decision.awaiting is None:
                awaiting = None
            else:
                if awaiting is None or awaiting[0] != decision.awaiting:
                    awaiting = (decision.awaiting, now)
                elif now - awaiting[1] >= patience:
                    awaiting = await _check_awaited(discovery, decision.awaiting, probe, down, clock)
                    if awaiting is None:
                        continue
                timeout = max(0.0, awaiting[1] + patience - now)
            log.debug("bootstrap: %s", decision.reason)
            await _next_event(queue, timeout)
    finally:
        discovery.unsubscribe(queue)


async def _check_awaited(discovery: CandidateSource, node_id: str,
                         probe: Callable[[Announcement], Awaitable[bool]],
                         down: dict[str, float], clock: Callable[[], float]) -> tuple[str, float] | None:
    """Probe the node we have waited on too long: None if it is down (now left out), else a
    fresh (node id, since) to wait another round of patience."""
    candidate = discovery.candidates().get(node_id)
    if candidate is not None and await probe(candidate):
        return (node_id, clock())
    log.warning("bootstrap: awaited node %s is down; leaving it out", node_id)
    down[node_id] = clock()
    return None


async def _announce_formed(discovery: CandidateSource) -> None:
    await discovery.update(discovery.announcement.model_copy(update={"formed": True}))


async def _next_event(queue: asyncio.Queue[CandidateEvent], timeout: float | None) -> None:
    """Return on the next discovery event, or after ``timeout`` seconds (never if None)."""
    try:
        await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        pass
    # Several events often arrive together; decide once for all of them.
    while not queue.empty():
        queue.get_nowait()
