"""``GET /metrics`` (Prometheus text format), ``GET /sd`` (Prometheus HTTP service discovery) and
the middleware that counts every API request by route template, method and status code.

Both endpoints need the cluster token, like the rest of the API: metrics name the cluster's
nodes, addresses and models, and ``/sd`` hands out every node's address. Prometheus sends the
token with ``authorization: {credentials_file: ...}`` in the scrape and SD configs
(``grafana/prometheus.yml``).
"""
from __future__ import annotations

import asyncio

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from reconciler.metrics import NodeMetrics
from reconciler.server.app import token_matches
from reconciler.server.auth import principal
from reconciler.server.errors import ApiError
from reconciler.server.keys import STORE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNMATCHED = "unmatched"  # the route label of requests no route matched (never the raw path)


def route_label(request: web.Request) -> str:
    """The route template (``/apis/.../{name}``), so the label's values stay few."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else UNMATCHED


def method_label(request: web.Request) -> str:
    """``WATCH`` for watch streams (their duration is the client's choice, not latency)."""
    if request.method == "GET" and request.query.get("watch") in ("1", "true", "True"):
        return "WATCH"
    return request.method


CLIENT_CLOSED_REQUEST = 499  # nginx's code for a request whose client left before the answer


def request_metrics_middleware(metrics: NodeMetrics, *,
                               clock: Callable[[], float] = time.perf_counter) -> Any:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = clock()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as error:
            code = error.status
            raise
        except asyncio.CancelledError:  # the client left (handlers are cancelled on disconnect)
            code = CLIENT_CLOSED_REQUEST
            raise
        finally:
            route, method = route_label(request), method_label(request)
            metrics.api_requests.labels(route, method, str(code)).inc()
            metrics.api_request_seconds.labels(route, method).observe(clock() - started)
    return observe


def sd_target_groups(nodes: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One target group per Ready node: its API address, the ``node`` label, and ``__meta_exo_*``
    labels for relabeling (role changes with elections, so it is not a target label itself)."""
    groups = []
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name, spec, status = node["metadata"]["name"], node.get("spec") or {}, node.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        if not ready or not spec.get("address") or not spec.get("apiPort"):
            continue
        host = spec["address"]
        host = f"[{host}]" if ":" in host else host
        labels = {"node": name, "__meta_exo_node_role": str(status.get("role", "")), "__meta_exo_node_id": str(spec.get("nodeId", "")),
                  "__scheme__": spec.get("apiScheme", "http")}  # HTTPS nodes: Prometheus needs the cluster CA
        for key, value in (node["metadata"].get("labels") or {}).items():
            labels["__meta_exo_node_label_" + "".join(c if c.isalnum() else "_" for c in key)] = str(value)
        groups.append({"targets": [f"{host}:{spec['apiPort']}"], "labels": labels})
    return groups


def _require_token(request: web.Request, token: str) -> None:
    if principal(request) is None and not token_matches(request.headers.get("Authorization"), token):
        raise ApiError(401, "Unauthorized: send Authorization: Bearer <token> (the cluster token); "
                       "in Prometheus, authorization.credentials_file",
                       headers={"WWW-Authenticate": 'Bearer realm="exo"'})


def add_metrics_routes(app: web.Application, *, metrics: NodeMetrics, token: str) -> None:
    """Mount /metrics and /sd, and count every request of the app (call before the app starts)."""
    if not token:
        raise ValueError("an API token is required")

    async def serve_metrics(request: web.Request) -> web.Response:
        _require_token(request, token)
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def serve_sd(request: web.Request) -> web.Response:
        _require_token(request, token)
        store = request.config_dict[STORE]
        groups = sd_target_groups(store.list("Node")[0])
        return web.json_response(groups)

    app.middlewares.insert(0, request_metrics_middleware(metrics))
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/sd", serve_sd)
