"""Watch streams: newline-delimited JSON events from the local replica, kubectl semantics.

Without a resourceVersion a watch first sends one ADDED per current object (from one immutable
snapshot), then every change after the snapshot's revision. With ``resourceVersion=N`` it sends
every change after N. With a label selector, an object that starts matching arrives as ADDED and
one that stops matching as DELETED, so a client's cache stays exact.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from exo_ctl.api.resources import API_VERSION
from exo_ctl.api.status import status_object
from reconciler.server.errors import ApiError
from reconciler.server.keys import Watches
from reconciler.server.query import FieldSelector
from reconciler.server.tables import COLUMNS, table
from exo_ctl.api.selectors import Selector
from reconciler.store.base import Gone, Store
from reconciler.store.state import Event, Key, StoreState

log = logging.getLogger(__name__)
WATCH_CONTENT_TYPE = "application/json;stream=watch"
BOOKMARK_INTERVAL_S = 10.0  # with ?allowWatchBookmarks=true, a quiet watch gets a fresh resourceVersion this often


class WatchFilter:
    """Which events a watcher sees, and as what type (deterministic; no I/O)."""

    def __init__(self, *, kind: str, namespace: str | None, selector: Selector, matching: set[Key],
                 fields: FieldSelector | None = None):
        self.kind, self.namespace, self.selector = kind, namespace, selector
        self.fields = fields or FieldSelector()
        self.matching = matching  # keys the watcher currently holds as matching

    @property
    def filters_nothing(self) -> bool:
        return self.selector.is_empty and self.fields.is_empty

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return self.selector.matches(obj["metadata"].get("labels")) and self.fields.matches(obj)

    def in_scope(self, obj: Mapping[str, Any]) -> bool:
        if obj.get("kind") != self.kind:
            return False
        return self.namespace is None or obj["metadata"].get("namespace") == self.namespace

    def translate(self, event_type: str, obj: Mapping[str, Any]) -> str | None:
        """The type to send for this event, or None to skip it."""
        if not self.in_scope(obj):
            return None
        if self.filters_nothing:
            return event_type
        key = _key(obj)
        was_matching = key in self.matching
        if event_type == "DELETED":
            self.matching.discard(key)
            return "DELETED" if was_matching or self.matches(obj) else None
        if self.matches(obj):
            self.matching.add(key)
            return "MODIFIED" if was_matching else "ADDED"
        if was_matching:
            self.matching.discard(key)
            return "DELETED"
        return None


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace") or "", meta["name"])


def matching_at(state: StoreState, revision: int, view: WatchFilter) -> set[Key]:
    """Keys whose object matched the selector at ``revision``, as far as the kept history tells:
    objects untouched since then as they are now, the others from their last event up to it."""
    matched: dict[Key, bool] = {}
    for event in state.history_for(view.kind):
        if event.revision > revision:
            break
        if view.in_scope(event.object):
            matched[_key(event.object)] = event.type != "DELETED" and view.matches(event.object)
    for key, obj in state.objects.items():
        if int(obj["metadata"]["resourceVersion"]) <= revision and view.in_scope(obj):
            matched[key] = view.matches(obj)
    return {key for key, ok in matched.items() if ok}


def _line(event_type: str, obj: Mapping[str, Any]) -> bytes:
    return (json.dumps({"type": event_type, "object": obj}, separators=(",", ":")) + "\n").encode()


class Renderer:
    """What each watch event carries: the object, or (for ``kubectl get -w``) a one-row Table whose
    first event holds the column definitions."""

    def __init__(self, *, as_table: bool, include: str = "PartialObjectMetadata"):
        self.as_table, self.include, self.headers_sent = as_table, include, False

    def line(self, event_type: str, obj: Mapping[str, Any]) -> bytes:
        if not self.as_table or event_type in ("ERROR", "BOOKMARK") or obj.get("kind") not in COLUMNS:
            return _line(event_type, obj)
        rendered = table(obj["kind"], [dict(obj)], list_meta={"resourceVersion": obj["metadata"]["resourceVersion"]},
                         include=self.include, headers=not self.headers_sent)
        self.headers_sent = True
        return _line(event_type, rendered)


def bookmark_revision(state: StoreState, kind: str, delivered: int) -> int:
    """The newest revision a watcher of ``kind`` that has everything up to ``delivered`` may resume
    from: just before the next event of its kind it has not received yet, else the current one."""
    pending = state.events_after(delivered, kind)
    return pending[0].revision - 1 if pending else state.revision


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _cancel(*futures: asyncio.Future[Any]) -> None:
    """Cancel helper futures and wait for them, without swallowing this task's own cancellation."""
    for future in futures:
        future.cancel()
    await asyncio.wait(futures)
    for future in futures:
        if not future.cancelled():
            future.exception()  # mark as retrieved


async def serve_watch(request: web.Request, *, store: Store, kind: str, namespace: str | None,
                      selector: Selector, since: int | None, timeout_s: float | None,
                      watches: Watches, fields: FieldSelector | None = None,
                      renderer: Renderer | None = None) -> web.StreamResponse:
    """Stream events until the client leaves, ``timeout_s`` passes, the app shuts down, or the
    watcher falls behind compacted history (a final ERROR event with a 410 Status)."""
    state = store.state
    if since is not None and since < (compacted := state.compacted_revision_for(kind)):
        raise ApiError(410, f"too old resource version: {since} ({compacted}); list again and watch from its resourceVersion")
    initial: list[tuple[str, Mapping[str, Any]]] = []
    view = WatchFilter(kind=kind, namespace=namespace, selector=selector, matching=set(), fields=fields)
    render = renderer or Renderer(as_table=False)
    if since is None:
        for key in sorted(k for k in state.objects if k[0] == kind):
            obj = state.objects[key]
            if (event_type := view.translate("ADDED", obj)) is not None:
                initial.append((event_type, obj))
        position = state.revision
    else:
        if not view.filters_nothing:
            view.matching = matching_at(state, since, view)
        position = since

    response = web.StreamResponse(headers={"Content-Type": WATCH_CONTENT_TYPE, "Cache-Control": "no-cache"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    events = store.watch(position, kind)
    next_event: asyncio.Future[Event] = asyncio.ensure_future(anext(events))
    closed = asyncio.ensure_future(watches.closing.wait())
    watches.open_count += 1
    bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("1", "true")
    next_bookmark, delivered = loop.time() + BOOKMARK_INTERVAL_S, position
    try:
        for event_type, obj in initial:
            await response.write(render.line(event_type, obj))
        while True:
            check = watches.disconnect_check_s
            wait = check if deadline is None else max(0.0, min(check, deadline - loop.time()))
            done, _ = await asyncio.wait({next_event, closed}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if next_event in done:
                try:
                    event = next_event.result()
                except Gone as error:
                    await response.write(_line("ERROR", status_object(410, f"{error}; list again and watch from its resourceVersion")))
                    break
                next_event = asyncio.ensure_future(anext(events))
                delivered = event.revision
                if (event_type := view.translate(event.type, event.object)) is not None:
                    await response.write(render.line(event_type, event.object))
                continue
            if closed in done or _disconnected(request) or (deadline is not None and loop.time() >= deadline):
                break
            if (reason := store.unready_reason()) is not None:  # a frozen replica must not look quiet
                await response.write(_line("ERROR", status_object(503, f"this node's replica may be stale: {reason}; "
                                                                       "watch through another node")))
                break
            if bookmarks and loop.time() >= next_bookmark:
                next_bookmark = loop.time() + BOOKMARK_INTERVAL_S
                if (mark := bookmark_revision(store.state, kind, delivered)) > delivered:
                    delivered = mark
                    await response.write(_line("BOOKMARK", {"kind": kind, "apiVersion": API_VERSION,
                                                            "metadata": {"resourceVersion": str(mark)}}))
        await response.write_eof()
    except ConnectionError:
        log.debug("watch client went away")
    finally:
        watches.open_count -= 1
        await _cancel(next_event, closed)
        await events.aclose()
    return response
