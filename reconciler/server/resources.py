"""Routes for the exo.dev/v1alpha1 resources: list/watch, get, create, replace, apply, status,
delete. Reads come from the local replica; writes go through ``store.submit`` (or, with
``?dryRun=All``, are computed on the replica without committing)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from exo_ctl.api.meta import API_VERSION
from exo_ctl.api.resources import KINDS, KindInfo
from reconciler.server import bodies, managed_fields, query
from reconciler.server.discovery import add_api_fallback, add_discovery_routes, kind_subresources
from reconciler.server.auth import stamp_writer
from reconciler.server.errors import ApiError
from reconciler.server.events_routes import add_event_routes
from reconciler.server.keys import STORE, WATCHES
from reconciler.server.openapi_k8s import add_openapi_k8s_routes
from reconciler.server.placement_preview import placement_header
from reconciler.server.tables import table, wants_table
from reconciler.server.watch import Renderer, serve_watch
from reconciler.server.writes import Target, WriteBody, commit, delete_options, object_write, patched, status_write
from reconciler.store.base import make_command

API_ROOT = f"/apis/{API_VERSION}"
APPLY_RESULT_HEADER = "X-Exo-Apply-Result"
PATCH_ATTEMPTS = 3  # a patch re-read and re-applied when another write won the race


class KindHandlers:
    """The handlers of one kind; the URL gives the namespace (namespaced kinds) and name."""

    def __init__(self, info: KindInfo):
        self.info = info

    def _target(self, request: web.Request) -> Target:
        namespace = request.match_info.get("namespace", "") if self.info.namespaced else ""
        return Target(self.info, namespace, request.match_info.get("name"))

    def _not_found(self, target: Target) -> ApiError:
        return ApiError(404, f'{target.resource} "{target.name}" not found', kind=self.info.plural, name=target.name)

    # -- reads --
    async def collection(self, request: web.Request) -> web.StreamResponse:
        store = request.config_dict[STORE]
        selector = query.label_selector(request)
        fields = query.field_selector(request, self.info.kind)
        namespace = request.match_info.get("namespace") if self.info.namespaced else None
        as_table = wants_table(request.headers.get("Accept", ""))
        include = query.include_object(request)
        if query.watch_requested(request):
            return await serve_watch(
                request, store=store, kind=self.info.kind, namespace=namespace, selector=selector,
                since=query.resource_version(request), timeout_s=query.timeout_seconds(request),
                watches=request.config_dict[WATCHES], fields=fields,
                renderer=Renderer(as_table=as_table, include=include),
            )
        items, revision = store.list(self.info.kind, namespace)
        query.list_resource_version(request, revision)
        items = [obj for obj in items if selector.matches(obj["metadata"].get("labels")) and fields.matches(obj)]
        if (after := query.continue_after(request)) is not None:
            items = [obj for obj in items if _position(obj) > after]
        list_meta: dict[str, Any] = {"resourceVersion": str(revision)}
        if (limit := query.limit(request)) is not None and len(items) > limit:
            list_meta["continue"] = query.encode_continue(revision=revision, after=_position(items[limit - 1]))
            list_meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        if as_table:
            return web.json_response(table(self.info.kind, items, list_meta=list_meta, include=include))
        return web.json_response({"apiVersion": API_VERSION, "kind": f"{self.info.kind}List",
                                  "metadata": list_meta, "items": items})

    async def get(self, request: web.Request) -> web.Response:
        target = self._target(request)
        obj = request.config_dict[STORE].get(target.key)
        if obj is None:
            raise self._not_found(target)
        if wants_table(request.headers.get("Accept", "")):
            meta = {"resourceVersion": obj["metadata"]["resourceVersion"]}
            return web.json_response(table(self.info.kind, [obj], list_meta=meta, include=query.include_object(request)))
        return web.json_response(obj)

    # -- writes --
    async def _write(self, request: web.Request, op: str, target: Target, *, body: dict[str, Any] | None = None,
                     expected_rv: str | None = None, expected_uid: str | None = None,
                     dry_run: bool = False) -> dict[str, Any]:
        command = make_command(op, target.key, body=stamp_writer(request, body), expected_rv=expected_rv,
                               expected_uid=expected_uid, op_id=None if dry_run else query.op_id(request))
        return await commit(request.config_dict[STORE], command, target=target, dry_run=dry_run)

    @staticmethod
    async def _preview(request: web.Request, result: dict[str, Any], dry_run: bool) -> dict[str, str]:
        """A dry run of a ModelDeployment write also answers where its layers would go."""
        return await placement_header(request.config_dict[STORE], result["object"]) if dry_run else {}

    async def create(self, request: web.Request) -> web.Response:
        dry_run = query.dry_run(request)
        target = self._target(request)
        write = object_write(await bodies.object_body(request), target)
        write.object["metadata"]["managedFields"] = managed_fields.update(
            None, write.object, manager=query.field_manager(request), now=query.now_rfc3339())
        target = Target(self.info, target.namespace, write.object["metadata"]["name"])
        result = await self._write(request, "create", target, body=write.object, dry_run=dry_run)
        return web.json_response(result["object"], status=201, headers=await self._preview(request, result, dry_run))

    async def replace(self, request: web.Request) -> web.Response:
        dry_run = query.dry_run(request)
        target = self._target(request)
        raw = await bodies.object_body(request)
        result = await self._tracked_write(request, target, lambda live: object_write(raw, target), dry_run=dry_run)
        return web.json_response(result["object"], headers=await self._preview(request, result, dry_run))

    async def patch(self, request: web.Request) -> web.Response:
        media, body = await bodies.patch_body(request)
        if media == bodies.APPLY_PATCH:
            return await self._apply(request, body)
        dry_run = query.dry_run(request)
        target = self._target(request)

        def make(live: dict[str, Any] | None) -> WriteBody:
            if live is None:
                raise self._not_found(target)
            return object_write(patched(live, media, body), target)
        result = await self._tracked_write(request, target, make, dry_run=dry_run)
        return web.json_response(result["object"], headers=await self._preview(request, result, dry_run))

    async def _tracked_write(self, request: web.Request, target: Target,
                             make: Callable[[dict[str, Any] | None], WriteBody], *, dry_run: bool) -> dict[str, Any]:
        """A replace whose managedFields record ``fieldManager`` as the owner of what it changed;
        pinned to the revision read, and redone on the newer object when another write won the race."""
        manager = query.field_manager(request)
        for attempt in range(PATCH_ATTEMPTS):
            live = request.config_dict[STORE].get(target.key)
            write = make(live)
            live_rv = live["metadata"]["resourceVersion"] if live is not None else None
            if live is not None:
                write.object["metadata"]["managedFields"] = managed_fields.update(
                    live, write.object, manager=manager, now=query.now_rfc3339())
            try:
                return await self._write(request, "replace", target, body=write.object,
                                         expected_rv=write.expected_rv or live_rv, expected_uid=write.expected_uid,
                                         dry_run=dry_run)
            except ApiError as error:
                if error.code != 409 or live is None or write.expected_rv not in (None, live_rv) \
                        or attempt == PATCH_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _live(self, request: web.Request, target: Target) -> dict[str, Any]:
        live = request.config_dict[STORE].get(target.key)
        if live is None:
            raise self._not_found(target)
        return live

    async def patch_status(self, request: web.Request) -> web.Response:
        media, body = await bodies.patch_body(request)
        target = self._target(request)
        live = self._live(request, target)
        new = body if media == bodies.APPLY_PATCH else patched(live, media, body)
        return await self._status(request, target, new, live)

    async def _apply(self, request: web.Request, body: Any) -> web.Response:
        """Server-side apply: the manifest's fields are merged into the live object and owned by
        ``fieldManager``; a field another manager set differently is a 409 unless ``force=true``."""
        dry_run = query.dry_run(request)
        target = self._target(request)
        manager, force = query.field_manager(request), query.force(request)
        force = force or "fieldManager" not in request.query  # older clients: the last apply wins, as before
        user = object_write(body, target)  # validates the manifest as sent
        applied = {**body, "metadata": {**(body.get("metadata") or {}), **{
            k: v for k, v in user.object["metadata"].items() if k in ("name", "namespace")}}}
        for attempt in range(PATCH_ATTEMPTS):
            live = request.config_dict[STORE].get(target.key)
            merged, entries = managed_fields.apply(live, applied, manager=manager, force=force,
                                                   now=query.now_rfc3339(), canonical=user.object)
            write = object_write(merged, target)
            write.object["metadata"]["managedFields"] = entries
            live_rv = live["metadata"]["resourceVersion"] if live is not None else None
            try:
                result = await self._write(request, "apply", target, body=write.object,
                                           expected_rv=user.expected_rv or live_rv, dry_run=dry_run)
                break
            except ApiError as error:
                if error.code != 409 or live is None or user.expected_rv is not None \
                        or attempt == PATCH_ATTEMPTS - 1:
                    raise
        action = result["action"]
        return web.json_response(result["object"], status=201 if action == "created" else 200,
                                 headers={APPLY_RESULT_HEADER: action, **await self._preview(request, result, dry_run)})

    async def replace_status(self, request: web.Request) -> web.Response:
        target = self._target(request)
        raw = await bodies.object_body(request)
        return await self._status(request, target, raw, self._live(request, target))

    async def _status(self, request: web.Request, target: Target, raw: Any, live: dict[str, Any]) -> web.Response:
        write = status_write(raw, target, live)
        result = await self._write(request, "status", target, body=write.object, expected_rv=write.expected_rv,
                                   dry_run=query.dry_run(request))
        return web.json_response(result["object"])

    # -- scale (autoscaling/v1 Scale over spec.replicas) --
    @staticmethod
    def _scale(obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                             if k in meta},
                "spec": {"replicas": obj["spec"].get("replicas", 1)},
                "status": {"replicas": (obj.get("status") or {}).get("readyReplicas", 0)}}

    async def get_scale(self, request: web.Request) -> web.Response:
        return web.json_response(self._scale(self._live(request, self._target(request))))

    async def write_scale(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if request.method == "PUT":
            media, body = "", await bodies.object_body(request)
        else:
            media, body = await bodies.patch_body(request)
            if media == bodies.APPLY_PATCH:
                raise ApiError(415, "server-side apply of the scale subresource is not supported: patch it with "
                               "application/merge-patch+json")
        live = self._live(request, target)
        scale = self._scale(live)
        new = body if not media else patched(scale, media, body)
        replicas = (new.get("spec") or {}).get("replicas") if isinstance(new, dict) else None
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError(422, f'Scale "{target.name}" is invalid: spec.replicas: must be a non-negative integer, '
                           f"got {replicas!r}", kind="Scale", name=target.name)
        rv = (new.get("metadata") or {}).get("resourceVersion") or live["metadata"]["resourceVersion"]
        write = object_write({**live, "spec": {**live["spec"], "replicas": replicas}}, target)
        result = await self._write(request, "replace", target, body=write.object, expected_rv=rv,
                                   dry_run=query.dry_run(request))
        return web.json_response(self._scale(result["object"]))

    async def delete(self, request: web.Request) -> web.Response:
        target = self._target(request)
        options = delete_options(await bodies.optional_json_body(request))
        dry_run = query.dry_run(request) or options.dryRun == ["All"]
        if options.dryRun not in (None, [], ["All"]):
            raise ApiError(400, f"dryRun: the only supported value is All, got {options.dryRun!r}")
        preconditions = options.preconditions
        result = await self._write(
            request, "delete", target, dry_run=dry_run,
            expected_rv=preconditions.resourceVersion if preconditions else None,
            expected_uid=preconditions.uid if preconditions else None,
        )
        return web.json_response(result["object"])


def _position(obj: dict[str, Any]) -> tuple[str, str]:
    return (obj["metadata"].get("namespace") or "", obj["metadata"]["name"])


def add_resource_routes(app: web.Application) -> None:
    """Mount discovery, the OpenAPI documents, and every kind's collection, item and subresource
    paths under /apis/exo.dev/v1alpha1."""
    add_discovery_routes(app)
    add_openapi_k8s_routes(app)
    add_event_routes(app)
    add_api_fallback(app)
    for info in KINDS.values():
        handlers = KindHandlers(info)
        if info.namespaced:
            app.router.add_get(f"{API_ROOT}/{info.plural}", handlers.collection)  # every namespace
            collection = f"{API_ROOT}/namespaces/{{namespace}}/{info.plural}"
        else:
            collection = f"{API_ROOT}/{info.plural}"
        item = collection + "/{name}"
        app.router.add_get(collection, handlers.collection)
        app.router.add_post(collection, handlers.create)
        app.router.add_get(item, handlers.get)
        app.router.add_put(item, handlers.replace)
        app.router.add_patch(item, handlers.patch)
        app.router.add_delete(item, handlers.delete)
        app.router.add_get(item + "/status", handlers.get)
        app.router.add_put(item + "/status", handlers.replace_status)
        app.router.add_patch(item + "/status", handlers.patch_status)
        if "scale" in kind_subresources(info):
            app.router.add_get(item + "/scale", handlers.get_scale)
            app.router.add_put(item + "/scale", handlers.write_scale)
            app.router.add_patch(item + "/scale", handlers.write_scale)
