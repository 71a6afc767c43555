"""The node's HTTP application: authentication, Status errors, health, and the resource API.

Other parts of the node mount their routes on the returned app before it starts (membership
under /internal, the OpenAI API under /v1, /metrics, the dashboard at /). Which role each route
needs is in server/auth.py's one table. Errors under /v1/ take OpenAI's shape instead of a Status.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from reconciler.server.auth import auth_middleware
from reconciler.server.auth_tokens import add_token_routes
from reconciler.server.errors import ApiError, status_response
from reconciler.server.keys import NODE, STORE, WATCHES, NodeInfo, Watches
from reconciler.server.openai_errors import is_openai_path, openai_error_response
from reconciler.server.resources import add_resource_routes
from reconciler.store.base import Store

log = logging.getLogger(__name__)
PROTECTED_PREFIXES = ("/apis", "/internal", "/v1")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_protected(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES)


def token_matches(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    if not header:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


@web.middleware
async def _status_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError → Status; aiohttp's own 404/405/413 under the API prefixes → Status; anything
    unexpected → a logged 500 Status (never a traceback to the client)."""
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as error:
        if error.status < 400 or not is_protected(request.path):
            raise
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        message = {404: f"the server could not find the requested resource ({request.path})",
                   405: f"method {request.method} is not allowed on {request.path}"}.get(error.status, error.reason)
        if is_openai_path(request.path):
            return openai_error_response(error.status, message, headers=headers)
        return status_response(error.status, message, headers=headers)
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        message = "internal error while handling the request; see the node's log"
        if is_openai_path(request.path):
            return openai_error_response(500, message)
        return status_response(500, message)


@web.middleware
async def _fresh_reads(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A node without quorum, or whose replica lags the leader, refuses resource reads (they
    could be stale) instead of serving a frozen replica with 200."""
    if request.method in ("GET", "HEAD") and (request.path == "/apis" or request.path.startswith("/apis/")):
        reason = request.config_dict[STORE].unready_reason()
        if reason is not None:
            raise ApiError(503, f"this node cannot serve reads now, they could be stale: {reason}; retry, or ask "
                           f"another node", headers={"Retry-After": "1"})
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    reason = request.config_dict[STORE].unready_reason()
    if reason is None:
        return web.Response(text="ok")
    return web.Response(status=503, text=f"not ready: {reason}")


async def _end_watches(app: web.Application) -> None:
    app[WATCHES].closing.set()


def create_app(*, store: Store, token: str, node_name: str, watch_disconnect_check_s: float = 10.0) -> web.Application:
    """The node's API app; the Store and node info are reachable through ``STORE`` and ``NODE``.
    ``token`` is the cluster secret (the root credential); role tokens live in the store."""
    if not token:
        raise ValueError("an API token is required")
    app = web.Application(middlewares=[_status_errors, auth_middleware(token), _fresh_reads])
    app[STORE] = store
    app[NODE] = NodeInfo(name=node_name)
    app[WATCHES] = Watches(disconnect_check_s=watch_disconnect_check_s)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_resource_routes(app)
    add_token_routes(app)
    app.on_shutdown.append(_end_watches)
    return app
