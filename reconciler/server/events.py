"""Kubernetes Events (core ``v1``): what the controllers did to an object and why.

``record_event`` is the controllers' one-line call: it never raises and never blocks the caller
(the write runs as a named task). An event with the same object, reason, type and message as an
earlier one bumps its ``count`` and ``lastTimestamp`` instead of adding another; after each write
the recorder deletes events older than ``EVENT_TTL_S`` and the oldest beyond ``EVENT_LIMIT``.
Served by events_routes.py. No aiohttp here: the controllers import this module.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from exo_ctl.api.meta import Frozen
from exo_ctl.api.resources import DEFAULT_NAMESPACE
from exo_ctl.api.columns import parse_timestamp
from reconciler.store.base import Store, StoreError, StoreUnavailable, make_command, utcnow_iso

log = logging.getLogger(__name__)
EVENT_KIND = "Event"
EVENT_LIMIT = 1000          # events kept cluster-wide; the oldest go first
EVENT_TTL_S = 3600.0        # an event not seen again for this long is deleted (Kubernetes' default)
EVENT_REASONS = ("Scheduled"  # the reasons the controllers record, "Unschedulable", "Loading", "Loaded", "LoadFailed", "NodeNotReady", "Replaced",
                 "Rebalanced")
_pending: set[asyncio.Task[None]] = set()  # strong references to the recorder's tasks


class ObjectReference(Frozen):
    apiVersion: str
    kind: str
    name: str
    namespace: str | None = None
    uid: str | None = None


class EventSource(Frozen):
    component: str
    host: str | None = None


class EventObject(Frozen):
    """The core/v1 Event shape kubectl prints and describe shows."""
    apiVersion: Literal["v1"] = "v1"
    kind: Literal["Event"] = "Event"
    metadata: dict[str, Any]
    involvedObject: ObjectReference
    reason: str = Field(min_length=1)
    message: str
    type: Literal["Normal", "Warning"] = "Normal"
    count: int = Field(ge=1)
    firstTimestamp: str
    lastTimestamp: str
    source: EventSource
    reportingComponent: str = ""


def reference(obj: Mapping[str, Any]) -> ObjectReference:
    meta = obj["metadata"]
    return ObjectReference(apiVersion=obj.get("apiVersion", "exo.dev/v1alpha1"), kind=obj["kind"],
                           name=meta["name"], namespace=meta.get("namespace") or None, uid=meta.get("uid"))


def event_name(ref: ObjectReference, *, reason: str, type_: str, message: str) -> str:
    """One name per (object, reason, type, message): a repeat is the same event, counted."""
    digest = hashlib.sha256("\0".join((ref.kind, ref.uid or "", reason, type_, message)).encode()).hexdigest()
    return f"{ref.name[:200]}.{digest[:16]}"


def next_event(live: Mapping[str, Any] | None, *, ref: ObjectReference, reason: str, message: str, type_: str,
               component: str, host: str | None, now: str) -> dict[str, Any]:
    """The event to store: a new one, or ``live`` seen once more."""
    if live is not None:
        return {**live, "count": int(live.get("count", 1)) + 1, "lastTimestamp": now}
    name = event_name(ref, reason=reason, type_=type_, message=message)
    event = EventObject(metadata={"name": name, "namespace": ref.namespace or DEFAULT_NAMESPACE}, involvedObject=ref,
                        reason=reason, message=message, type=type_, count=1, firstTimestamp=now, lastTimestamp=now,
                        source=EventSource(component=component, host=host), reportingComponent=component)
    return event.model_dump(mode="json", exclude_none=True)


def expired(events: list[Mapping[str, Any]], *, now: float, ttl_s: float = EVENT_TTL_S,
            limit: int = EVENT_LIMIT) -> list[tuple[str, str]]:
    """(namespace, name) of the events to delete: the stale ones, then the oldest beyond ``limit``."""
    def seen(event: Mapping[str, Any]) -> float:
        return parse_timestamp(event.get("lastTimestamp")) or 0.0
    ordered = sorted(events, key=seen)
    stale = [e for e in ordered if now - seen(e) > ttl_s]
    fresh = [e for e in ordered if now - seen(e) <= ttl_s]
    doomed = stale + fresh[:max(0, len(fresh) - limit)]
    return [(e["metadata"]["namespace"], e["metadata"]["name"]) for e in doomed]


async def write_event(store: Store, obj: Mapping[str, Any], *, reason: str, message: str, type_: str = "Normal",
                      component: str, host: str | None = None, now: float | None = None,
                      limit: int = EVENT_LIMIT, ttl_s: float = EVENT_TTL_S) -> None:
    """Record (or count again) one event, then prune. Failures are logged, never raised."""
    ref = reference(obj)
    namespace = ref.namespace or DEFAULT_NAMESPACE
    key = (EVENT_KIND, namespace, event_name(ref, reason=reason, type_=type_, message=message))
    stamp = utcnow_iso((lambda: now) if now is not None else None)
    try:
        live = store.get(key)
        body = next_event(live, ref=ref, reason=reason, message=message, type_=type_, component=component,
                          host=host, now=stamp)
        op = "create" if live is None else "replace"
        await store.submit(make_command(op, key, body=body, now=stamp,
                                        expected_rv=None if live is None else live["metadata"]["resourceVersion"]))
        events, _ = store.list(EVENT_KIND)
        for doomed_namespace, doomed in expired(events, now=now if now is not None else time.time(), ttl_s=ttl_s,
                                                limit=limit):
            await store.submit(make_command("delete", (EVENT_KIND, doomed_namespace, doomed)))
    except (StoreError, StoreUnavailable) as error:  # a lost race or no quorum: events are best effort
        log.debug("event %s for %s/%s not recorded: %s", reason, ref.kind, ref.name, error)


def record_event(store: Store, obj: Mapping[str, Any], *, reason: str, message: str, type_: str = "Normal",
                 component: str, host: str | None = None) -> None:
    """Record an event without waiting for it (the controllers' call). Needs a running loop."""
    task = asyncio.get_running_loop().create_task(
        write_event(store, obj, reason=reason, message=message, type_=type_, component=component, host=host),
        name=f"event-{reason}-{obj['metadata']['name']}")
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def placement_message(desired: Mapping[str, Mapping[str, Any]]) -> str:
    """``shard tiny-0-0 on node-a (layers 0-11)``, for every shard of a placement."""
    return "; ".join(f"shard {name} on {body['spec']['nodeName']} (layers {body['spec']['layers']['start']}-"
                     f"{body['spec']['layers']['end'] - 1})" for name, body in sorted(desired.items()))
