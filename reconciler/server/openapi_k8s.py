"""Kubernetes-style OpenAPI documents: ``/openapi/v2`` (Swagger 2.0) and ``/openapi/v3`` (the index
plus ``/openapi/v3/apis/exo.dev/v1alpha1``), what ``kubectl explain`` and kubectl's field validation
read. The schemas are the pydantic models behind manifests/schema/ (exo_ctl.api.schema), rewritten
as structural schemas (no ``anyOf`` nulls, int-or-string quantities) and tagged with
``x-kubernetes-group-version-kind``.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from exo_ctl.api.meta import API_VERSION, GROUP, VERSION
from exo_ctl.api.resources import KINDS, KindInfo
from exo_ctl.api.schema import kind_schemas
from reconciler.server.discovery import kind_subresources
from reconciler.server.errors import ApiError

PREFIX = "dev.exo.v1alpha1."
V3_GROUP_PATH = f"apis/{API_VERSION}"
OPENAPI_FALLBACK_PATH = "/openapi/{rest}"  # canonical form of the catch-all route
_DROP = ("title", "additionalProperties")


def structural(schema: Any, ref: str) -> Any:
    """One pydantic JSON Schema node as a Kubernetes structural schema; refs point at ``ref``+name."""
    if isinstance(schema, list):
        return [structural(item, ref) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    variants = [v for v in schema.get("anyOf", []) if v.get("type") != "null"]
    if "anyOf" in schema:
        types = {v.get("type") for v in variants}
        if types == {"string", "integer"}:
            out["x-kubernetes-int-or-string"] = True
        elif len(variants) == 1:
            out.update(structural(variants[0], ref))
    for key, value in schema.items():
        if key == "anyOf" or key in _DROP and value is False or key == "title":
            continue
        if key == "$ref":
            out["$ref"] = ref + PREFIX + value.rsplit("/", 1)[-1]
        elif key == "const":
            out.setdefault("type", "string")
            out["enum"] = [value]
        elif key == "default" and value is None:
            continue
        elif key in ("properties", "$defs"):
            out[key] = {name: structural(item, ref) for name, item in value.items()}
        else:
            out[key] = structural(value, ref)
    return out


def _gvk(kind: str) -> list[dict[str, str]]:
    return [{"group": GROUP, "kind": kind, "version": VERSION}]


def definitions(ref: str) -> dict[str, Any]:
    """Every named schema: the kinds, their parts, and a ``List`` of each kind."""
    out: dict[str, Any] = {}
    for name, schema in kind_schemas().items():
        out[PREFIX + name] = structural(schema, ref)
    for info in KINDS.values():
        out[PREFIX + info.kind]["x-kubernetes-group-version-kind"] = _gvk(info.kind)
        out[PREFIX + info.kind].setdefault("description", f"{info.kind} of {API_VERSION}")
        out[PREFIX + info.kind + "List"] = {
            "type": "object", "required": ["items"], "description": f"a list of {info.kind}",
            "x-kubernetes-group-version-kind": _gvk(f"{info.kind}List"),
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                           "metadata": {"type": "object"},
                           "items": {"type": "array", "items": {"$ref": ref + PREFIX + info.kind}}}}
    return out


_WRITE_PARAMETERS = ("dryRun", "fieldManager", "fieldValidation")


def _parameters(names: tuple[str, ...], *, v3: bool) -> list[dict[str, Any]]:
    if v3:
        return [{"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": True}} for n in names]
    return [{"name": n, "in": "query", "type": "string", "uniqueItems": True} for n in names]


def _operation(info: KindInfo, action: str, ref: str, *, v3: bool, kind: str | None = None) -> dict[str, Any]:
    kind = kind or info.kind
    schema = {"$ref": ref + PREFIX + kind}
    response = {"description": "OK", "content": {"application/json": {"schema": schema}}} if v3 else \
        {"description": "OK", "schema": schema}
    operation: dict[str, Any] = {
        "operationId": f"{action}{info.kind}", "x-kubernetes-action": action, "responses": {"200": response},
        "x-kubernetes-group-version-kind": {"group": GROUP, "kind": info.kind, "version": VERSION}}
    writes = action in ("post", "put", "patch")
    if writes:
        operation["parameters"] = _parameters(_WRITE_PARAMETERS + (("force",) if action == "patch" else ()), v3=v3)
    return operation


def paths(ref: str, *, v3: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for info in KINDS.values():
        collection = info.path("{namespace}") if info.namespaced else info.path()
        item = collection + "/{name}"
        out[collection] = {"get": _operation(info, "list", ref, v3=v3, kind=info.kind + "List"),
                           "post": _operation(info, "post", ref, v3=v3)}
        out[item] = {"get": _operation(info, "get", ref, v3=v3), "put": _operation(info, "put", ref, v3=v3),
                     "patch": _operation(info, "patch", ref, v3=v3), "delete": _operation(info, "delete", ref, v3=v3)}
        for sub in kind_subresources(info):
            if sub == "status":
                out[f"{item}/status"] = {"get": _operation(info, "get", ref, v3=v3),
                                         "put": _operation(info, "put", ref, v3=v3),
                                         "patch": _operation(info, "patch", ref, v3=v3)}
    return out


def swagger_document() -> dict[str, Any]:
    ref = "#/definitions/"
    return {"swagger": "2.0", "info": {"title": "exo", "version": API_VERSION}, "paths": paths(ref, v3=False),
            "definitions": definitions(ref)}


def group_document() -> dict[str, Any]:
    ref = "#/components/schemas/"
    return {"openapi": "3.0.0", "info": {"title": "exo", "version": API_VERSION}, "paths": paths(ref, v3=True),
            "components": {"schemas": definitions(ref)}}


def _etag(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:32].upper()


def add_openapi_k8s_routes(app: web.Application) -> None:
    swagger, group = swagger_document(), group_document()
    group_hash = _etag(group)
    index = {"paths": {V3_GROUP_PATH: {"serverRelativeURL": f"/openapi/v3/{V3_GROUP_PATH}?hash={group_hash}"}}}

    async def serve_unknown(request: web.Request) -> web.Response:
        raise ApiError(404, f"the server could not find the requested resource ({request.path}); this server "
                       "serves /openapi/v2 and /openapi/v3")

    async def serve_v2(request: web.Request) -> web.Response:
        return web.json_response(swagger)

    async def serve_v3_index(request: web.Request) -> web.Response:
        return web.json_response(index)

    async def serve_v3(request: web.Request) -> web.Response:
        if request.match_info["path"] != V3_GROUP_PATH:
            raise ApiError(404, f"the server could not find the requested resource ({request.path}); "
                           f"this server serves /openapi/v3/{V3_GROUP_PATH}")
        return web.json_response(group, headers={"ETag": f'"{group_hash}"', "Cache-Control": "public, immutable"})

    app.router.add_get("/openapi/v2", serve_v2)
    app.router.add_get("/openapi/v3", serve_v3_index)
    app.router.add_get("/openapi/v3/{path:.+}", serve_v3)
    app.router.add_get("/openapi/{rest:.*}", serve_unknown)
