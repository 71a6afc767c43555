"""Routes for the exo.dev/v1alpha1 resources: list/watch, get, create, replace, apply, status,
delete. Reads come from the local replica; writes go through ``store.submit`` (or, with
``?dryRun=All``, are computed on the replica without committing)."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from exo_ctl.api.meta import API_VERSION
from exo_ctl.api.resources import KINDS, KindInfo
from reconciler.server import bodies, query
from reconciler.server.errors import ApiError
from reconciler.server.keys import STORE, WATCHES
from reconciler.server.placement_preview import placement_header
from reconciler.server.watch import serve_watch
from reconciler.server.writes import Target, commit, delete_options, object_write, status_write
from reconciler.store.base import make_command

API_ROOT = f"/apis/{API_VERSION}"
APPLY_RESULT_HEADER = "X-Exo-Apply-Result"


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
        namespace = request.match_info.get("namespace") if self.info.namespaced else None
        if query.watch_requested(request):
            return await serve_watch(
                request, store=store, kind=self.info.kind, namespace=namespace, selector=selector,
                since=query.resource_version(request), timeout_s=query.timeout_seconds(request),
                watches=request.config_dict[WATCHES],
            )
        items, revision = store.list(self.info.kind, namespace)
        return web.json_response({
            "apiVersion": API_VERSION, "kind": f"{self.info.kind}List",
            "metadata": {"resourceVersion": str(revision)},
            "items": [obj for obj in items if selector.matches(obj["metadata"].get("labels"))],
        })

    async def get(self, request: web.Request) -> web.Response:
        target = self._target(request)
        obj = request.config_dict[STORE].get(target.key)
        if obj is None:
            raise self._not_found(target)
        return web.json_response(obj)

    # -- writes --
    async def _write(self, request: web.Request, op: str, target: Target, *, body: dict[str, Any] | None = None,
                     expected_rv: str | None = None, expected_uid: str | None = None,
                     dry_run: bool = False) -> dict[str, Any]:
        command = make_command(op, target.key, body=body, expected_rv=expected_rv, expected_uid=expected_uid,
                               op_id=None if dry_run else query.op_id(request))
        return await commit(request.config_dict[STORE], command, target=target, dry_run=dry_run)

    @staticmethod
    async def _preview(request: web.Request, result: dict[str, Any], dry_run: bool) -> dict[str, str]:
        """A dry run of a ModelDeployment write also answers where its layers would go."""
        return await placement_header(request.config_dict[STORE], result["object"]) if dry_run else {}

    async def create(self, request: web.Request) -> web.Response:
        dry_run = query.dry_run(request)
        target = self._target(request)
        write = object_write(await bodies.object_body(request), target)
        target = Target(self.info, target.namespace, write.object["metadata"]["name"])
        result = await self._write(request, "create", target, body=write.object, dry_run=dry_run)
        return web.json_response(result["object"], status=201, headers=await self._preview(request, result, dry_run))

    async def replace(self, request: web.Request) -> web.Response:
        dry_run = query.dry_run(request)
        target = self._target(request)
        write = object_write(await bodies.object_body(request), target)
        result = await self._write(request, "replace", target, body=write.object, expected_rv=write.expected_rv,
                                   expected_uid=write.expected_uid, dry_run=dry_run)
        return web.json_response(result["object"], headers=await self._preview(request, result, dry_run))

    async def apply(self, request: web.Request) -> web.Response:
        dry_run = query.dry_run(request)
        target = self._target(request)
        write = object_write(await bodies.apply_body(request), target)
        result = await self._write(request, "apply", target, body=write.object, expected_rv=write.expected_rv,
                                   dry_run=dry_run)
        action = result["action"]
        return web.json_response(result["object"], status=201 if action == "created" else 200,
                                 headers={APPLY_RESULT_HEADER: action, **await self._preview(request, result, dry_run)})

    async def replace_status(self, request: web.Request) -> web.Response:
        dry_run = query.dry_run(request)
        target = self._target(request)
        raw = await bodies.object_body(request)
        live = request.config_dict[STORE].get(target.key)
        if live is None:
            raise self._not_found(target)
        write = status_write(raw, target, live)
        result = await self._write(request, "status", target, body=write.object, expected_rv=write.expected_rv,
                                   dry_run=dry_run)
        return web.json_response(result["object"])

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


def add_resource_routes(app: web.Application) -> None:
    """Mount every kind's collection, item and status paths under /apis/exo.dev/v1alpha1."""
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
        app.router.add_patch(item, handlers.apply)
        app.router.add_delete(item, handlers.delete)
        app.router.add_get(item + "/status", handlers.get)
        app.router.add_put(item + "/status", handlers.replace_status)
