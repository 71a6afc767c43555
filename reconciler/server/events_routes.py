"""``/api/v1/[namespaces/NS/]events``: Events listed, watched (field selectors on involvedObject,
as ``kubectl describe`` asks) and read, as core/v1 objects or Tables."""
from __future__ import annotations

from aiohttp import web

from reconciler.server import query
from reconciler.server.errors import ApiError
from reconciler.server.events import EVENT_KIND
from reconciler.server.keys import STORE, WATCHES
from reconciler.server.tables import table, wants_table
from reconciler.server.watch import Renderer, serve_watch


async def list_events(request: web.Request) -> web.StreamResponse:
    store = request.config_dict[STORE]
    namespace = request.match_info.get("namespace")
    selector, fields = query.label_selector(request), query.field_selector(request, EVENT_KIND)
    as_table, include = wants_table(request.headers.get("Accept", "")), query.include_object(request)
    if query.watch_requested(request):
        return await serve_watch(request, store=store, kind=EVENT_KIND, namespace=namespace, selector=selector,
                                 since=query.resource_version(request), timeout_s=query.timeout_seconds(request),
                                 watches=request.config_dict[WATCHES], fields=fields,
                                 renderer=Renderer(as_table=as_table, include=include))
    items, revision = store.list(EVENT_KIND, namespace)
    query.list_resource_version(request, revision)
    items = [e for e in items if selector.matches(e["metadata"].get("labels")) and fields.matches(e)]
    meta = {"resourceVersion": str(revision)}
    if as_table:
        return web.json_response(table(EVENT_KIND, items, list_meta=meta, include=include))
    return web.json_response({"apiVersion": "v1", "kind": "EventList", "metadata": meta, "items": items})


async def get_event(request: web.Request) -> web.Response:
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    event = request.config_dict[STORE].get((EVENT_KIND, namespace, name))
    if event is None:
        raise ApiError(404, f'events "{name}" not found', kind="events", name=name)
    return web.json_response(event)


EVENT_PATHS = ("/api/v1/events", "/api/v1/namespaces/{namespace}/events")
EVENT_ITEM_PATH = "/api/v1/namespaces/{namespace}/events/{name}"


def add_event_routes(app: web.Application) -> None:
    for path in EVENT_PATHS:
        app.router.add_get(path, list_events)
    app.router.add_get(EVENT_ITEM_PATH, get_event)
