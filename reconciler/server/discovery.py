"""Kubernetes API discovery: ``/version``, ``/api``, ``/apis`` (legacy lists and the aggregated
``apidiscovery.k8s.io/v2`` form kubectl asks for first) and the ``exo.dev/v1alpha1`` resource list.

Pure documents built from ``KINDS``; the routes only pick the form the client accepts.
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from typing import Any

from aiohttp import web

from exo_ctl.api.meta import API_VERSION, GROUP, VERSION
from exo_ctl.api.resources import KINDS, KindInfo
from reconciler.server.errors import ApiError

AGGREGATED_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
CATEGORIES = ("exo",)  # `kubectl get exo`; namespaced kinds are also in "all", as workloads are
ITEM_VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
READ_VERBS = ("get", "list", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")
# The core group serves only Events (what describe and `kubectl get events` read).
CORE_RESOURCES = ({"name": "events", "singularName": "event", "namespaced": True, "kind": "Event",
                   "verbs": list(READ_VERBS), "shortNames": ["ev"]},)


# The Kubernetes API level served (what kubectl v1.32 and the client libraries check for);
# our own version rides in the build metadata, as k3s does (v1.32.0+exo.0.1.0).
KUBERNETES_LEVEL = (1, 32)


def version_info() -> dict[str, str]:
    try:
        ours = metadata.version("exoctl")
    except metadata.PackageNotFoundError:
        ours = "0.0.0"
    major, minor = KUBERNETES_LEVEL
    return {"major": str(major), "minor": str(minor), "gitVersion": f"v{major}.{minor}.0+exo.{ours}",
            "gitCommit": "", "gitTreeState": "",
            "buildDate": "", "goVersion": "", "compiler": "cpython",
            "platform": f"{platform.system().lower()}/{platform.machine().lower()}"}


def kind_subresources(info: KindInfo) -> tuple[str, ...]:
    """status for every kind; scale for the kinds with spec.replicas."""
    return ("status", "scale") if "replicas" in info.model.model_fields["spec"].annotation.model_fields else ("status",)


def categories(info: KindInfo) -> list[str]:
    return ["all", *CATEGORIES] if info.namespaced else list(CATEGORIES)


def _verbs(info: KindInfo) -> list[str]:
    return list(ITEM_VERBS) if info.user_writable else sorted({*READ_VERBS, "patch", "update", "delete"})


def api_resource_list() -> dict[str, Any]:
    """The legacy ``/apis/exo.dev/v1alpha1`` APIResourceList."""
    resources: list[dict[str, Any]] = []
    for info in KINDS.values():
        resources.append({"name": info.plural, "singularName": info.singular, "namespaced": info.namespaced,
                          "kind": info.kind, "verbs": _verbs(info), "shortNames": list(info.short_names),
                          "categories": categories(info)})
        for sub in kind_subresources(info):
            kind = "Scale" if sub == "scale" else info.kind
            resources.append({"name": f"{info.plural}/{sub}", "singularName": "", "namespaced": info.namespaced,
                              "kind": kind, "verbs": list(SUBRESOURCE_VERBS),
                              **({"group": "autoscaling", "version": "v1"} if sub == "scale" else {})})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": API_VERSION, "resources": resources}


def core_resource_list() -> dict[str, Any]:
    return {"kind": "APIResourceList", "groupVersion": "v1", "resources": [dict(r) for r in CORE_RESOURCES]}


def _group() -> dict[str, Any]:
    version = {"groupVersion": API_VERSION, "version": VERSION}
    return {"name": GROUP, "versions": [version], "preferredVersion": version}


def api_group_list() -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group()]}


def api_versions() -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}


def _discovered(info: KindInfo) -> dict[str, Any]:
    gvk = {"group": GROUP, "version": VERSION, "kind": info.kind}
    subresources = [{"subresource": sub, "verbs": list(SUBRESOURCE_VERBS),
                     "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"} if sub == "scale"
                     else gvk} for sub in kind_subresources(info)]
    return {"resource": info.plural, "responseKind": gvk, "scope": "Namespaced" if info.namespaced else "Cluster",
            "singularResource": info.singular, "verbs": _verbs(info), "shortNames": list(info.short_names),
            "categories": categories(info), "subresources": subresources}


def aggregated_discovery(*, core: bool) -> dict[str, Any]:
    """The APIGroupDiscoveryList of ``/api`` (core) or ``/apis`` (exo.dev)."""
    if core:
        resources = [{"resource": r["name"], "responseKind": {"group": "", "version": "v1", "kind": r["kind"]},
                      "scope": "Namespaced", "singularResource": r["singularName"], "verbs": r["verbs"],
                      "shortNames": r["shortNames"]} for r in CORE_RESOURCES]
        item = {"metadata": {"name": ""}, "versions": [{"version": "v1", "resources": resources,
                                                         "freshness": "Current"}]}
    else:
        item = {"metadata": {"name": GROUP}, "versions": [{
            "version": VERSION, "resources": [_discovered(info) for info in KINDS.values()], "freshness": "Current"}]}
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": [item]}


def wants_aggregated(accept: str) -> bool:
    """Whether the Accept header asks for apidiscovery v2 (the first acceptable type wins)."""
    for part in accept.split(","):
        params = {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in part.split(";")[1:])}
        if params.get("g") == "apidiscovery.k8s.io" and params.get("v") == "v2" \
                and params.get("as") == "APIGroupDiscoveryList":
            return True
        if part.split(";")[0].strip() in ("application/json", "*/*") and not params:
            return False
    return False


def _discovery(request: web.Request, *, core: bool, legacy: dict[str, Any]) -> web.Response:
    if wants_aggregated(request.headers.get("Accept", "")):
        return web.Response(text=json.dumps(aggregated_discovery(core=core)),
                            headers={"Content-Type": AGGREGATED_V2, "Vary": "Accept"})
    return web.json_response(legacy, headers={"Vary": "Accept"})


async def serve_version(request: web.Request) -> web.Response:
    return web.json_response(version_info())


async def serve_api(request: web.Request) -> web.Response:
    return _discovery(request, core=True, legacy=api_versions())


async def serve_apis(request: web.Request) -> web.Response:
    return _discovery(request, core=False, legacy=api_group_list())


async def serve_group(request: web.Request) -> web.Response:
    return web.json_response({"kind": "APIGroup", "apiVersion": "v1", **_group()})


async def serve_group_version(request: web.Request) -> web.Response:
    return web.json_response(api_resource_list())


async def serve_core_version(request: web.Request) -> web.Response:
    return web.json_response(core_resource_list())


async def not_found(request: web.Request) -> web.Response:
    raise ApiError(404, f"the server could not find the requested resource ({request.path})")


DISCOVERY_PATHS = {"/version": serve_version, "/version/": serve_version, "/api": serve_api, "/api/": serve_api,
                   "/api/v1": serve_core_version, "/apis": serve_apis, "/apis/": serve_apis,
                   f"/apis/{GROUP}": serve_group, f"/apis/{API_VERSION}": serve_group_version}
API_FALLBACK_PATH = "/api/v1/{rest}"  # canonical form of the route below; /api/* is also Ollama's


def add_discovery_routes(app: web.Application) -> None:
    for path, handler in DISCOVERY_PATHS.items():
        app.router.add_get(path, handler)


def add_api_fallback(app: web.Application) -> None:
    """Unknown ``/api/v1/...`` paths answer a 404 Status; mounted after every core API route."""
    app.router.add_get("/api/v1/{rest:.*}", not_found)
