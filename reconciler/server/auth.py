"""Who may call what: the one route → role table, and the middleware that enforces it.

Roles, each including the ones after it: ``admin`` (everything: tokens, node operations), ``edit``
(ModelDeployments), ``view`` (get/list/watch, /metrics, /sd), ``inference`` (the model APIs only). A bearer
token is a role token (``exo_<id>_<random>``, kept hashed in the replicated state, checked against
this node's replica on every request) or the cluster secret, the root credential, accepted as
admin only over TLS or from loopback. ``public`` routes need nothing; ``authenticated`` ones any
valid token (discovery); ``member`` ones are node-to-node and check the member proof themselves.
A route missing from the table is admin-only, and the role-matrix test fails on it.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import fnmatchcase

from aiohttp import web

from exo_ctl.api.meta import LAST_WRITER_ANNOTATION

from reconciler.server.errors import ApiError
from reconciler.server.keys import STORE
from reconciler.server.ollama_api import OLLAMA_PATHS, ollama_error_response
from reconciler.server.openai_errors import is_openai_path, openai_error_response

log = logging.getLogger(__name__)

ROLES = ("admin", "edit", "view", "inference")
PUBLIC, AUTHENTICATED, MEMBER = "public", "authenticated", "member"
# Each role includes the ones after it: admin > edit > view > inference (the dashboard views and chats).
GRANTS = {role: frozenset(ROLES[i:]) for i, role in enumerate(ROLES)}
TOKEN_KIND = "ApiToken"   # replicated objects (kind, "", id); never served under /apis
TOKEN_PREFIX = "exo_"
ROOT_ID = "cluster-secret"
ANTHROPIC_MESSAGES = "/v1/messages"
READS = frozenset({"GET", "HEAD"})
ALL = None
LAST_WRITER = LAST_WRITER_ANNOTATION
MAX_AGENT = 120
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Rule:
    """Routes whose canonical path matches ``pattern`` (fnmatch: ``*`` spans '/') and whose
    method is in ``methods`` (None: any) need ``role``."""
    pattern: str
    role: str
    methods: frozenset[str] | None = ALL


# First match wins. Extend here when adding a route; tests/server/test_auth_roles.py walks it.
ROUTE_ROLES: tuple[Rule, ...] = (
    Rule("/healthz", PUBLIC), Rule("/readyz", PUBLIC), Rule("/livez", PUBLIC),
    Rule("/openapi.json", PUBLIC),                      # describes routes, holds no data
    Rule("/", PUBLIC), Rule("/dashboard/*", PUBLIC),    # the dashboard's page and scripts
    Rule("/version", PUBLIC), Rule("/version/", PUBLIC),
    Rule("/internal/v1/members", MEMBER), Rule("/internal/v1/consistency", MEMBER),
    Rule("/admin/v1/*", "admin"),
    Rule("/apis/exo.dev/v1alpha1/*modeldeployments*", "edit", WRITES),
    Rule("/api", AUTHENTICATED, READS), Rule("/api/", AUTHENTICATED, READS), Rule("/api/v1", AUTHENTICATED, READS),
    Rule("/apis", AUTHENTICATED, READS), Rule("/apis/", AUTHENTICATED, READS),
    Rule("/apis/exo.dev", AUTHENTICATED, READS), Rule("/apis/exo.dev/v1alpha1", AUTHENTICATED, READS),
    Rule("/openapi/*", AUTHENTICATED, READS),
    Rule("/apis/*", "view", READS), Rule("/api/v1/*", "view", READS),
    Rule("/metrics", "view"), Rule("/sd", "view"),
    Rule("/internal/v1/datapath", "view"),
    Rule("/internal/dashboard/v1/*", "view"),
    Rule("/v1/*", "inference"),
    Rule("/api/chat", "inference"), Rule("/api/generate", "inference"), Rule("/api/embed", "inference"),
    Rule("/api/embeddings", "inference"), Rule("/api/tags", "inference"), Rule("/api/show", "inference"),
    Rule("/api/ps", "inference"), Rule("/api/version", "inference"),
    Rule("/api/*", AUTHENTICATED, READS),               # discovery's 404 fallback for unknown /api paths
    Rule("/apis/*", "admin"),                           # writes to Nodes and Shards: node operations
)
PROTECTED_PREFIXES = ("/apis", "/api", "/internal", "/v1", "/admin")


def required_role(method: str, canonical: str) -> str:
    for rule in ROUTE_ROLES:
        if (rule.methods is None or method in rule.methods) and fnmatchcase(canonical, rule.pattern):
            return rule.role
    return "admin"


def is_listed(method: str, canonical: str) -> bool:
    return any((r.methods is None or method in r.methods) and fnmatchcase(canonical, r.pattern) for r in ROUTE_ROLES)


@dataclass(frozen=True)
class Principal:
    id: str     # the token's id, or ROOT_ID for the cluster secret
    role: str

    def may(self, role: str) -> bool:
        return role in (PUBLIC, AUTHENTICATED) or role in GRANTS.get(self.role, ())


PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("exo.principal", Principal)  # set by the middleware


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token: str) -> str | None:
    """``exo_<id>_<random>`` → id (None for anything else)."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    ident, sep, rest = token[len(TOKEN_PREFIX):].partition("_")
    return ident if sep and ident.isalnum() and rest else None


def parse_time(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def token_refusal(spec: dict, *, now: float) -> str | None:
    """Why a stored token no longer works (revoked, expired), or None."""
    if spec.get("revoked"):
        return "revoked"
    expires = spec.get("expires")
    if expires and parse_time(expires) <= now:
        return "expired"
    return None


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, presented = header.partition(" ")
    return presented.strip() or None if scheme.lower() == "bearer" else None


def root_allowed(request: web.Request) -> bool:
    """The cluster secret counts only over TLS or from a loopback peer (never sniffable plain HTTP)."""
    transport = request.transport
    if transport is None:
        return False
    if transport.get_extra_info("sslcontext") is not None:
        return True
    peer = transport.get_extra_info("peername")
    try:
        return peer is not None and ipaddress.ip_address(peer[0]).is_loopback
    except (ValueError, TypeError, IndexError):
        return False


class AuthError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def authenticate(request: web.Request, *, root: str, clock: Callable[[], float] = time.time) -> Principal | None:
    """The request's Principal, None without a recognised credential; AuthError for a token that
    is known but refused. Never echoes the presented value."""
    presented = bearer(request.headers.get("Authorization"))
    if presented is None and request.path == ANTHROPIC_MESSAGES:  # the anthropic SDK's api_key header
        presented = request.headers.get("x-api-key", "").strip() or None
    if presented is None:
        return None
    if hmac.compare_digest(presented.encode(), root.encode()):
        if not root_allowed(request):
            raise AuthError(401, "the cluster secret is accepted only over TLS or from loopback; use a role token "
                                 "(exoctl token create --role ...)")
        return Principal(ROOT_ID, "admin")
    ident = token_id(presented)
    stored = request.config_dict[STORE].get((TOKEN_KIND, "", ident)) if ident else None
    if stored is None:
        return None
    spec = stored.get("spec", {})
    if not hmac.compare_digest(token_sha256(presented).encode(), str(spec.get("sha256", "")).encode()):
        return None
    if (refusal := token_refusal(spec, now=clock())) is not None:
        raise AuthError(401, f"token {ident} is {refusal}")
    return Principal(ident, str(spec.get("role")))


def principal(request: web.Request) -> Principal | None:
    """Who the middleware authenticated this request as (None: nobody)."""
    return request.get(PRINCIPAL)


def is_admin(request: web.Request) -> bool:
    found = principal(request)
    return found is not None and found.may("admin")


def stamp_writer(request: web.Request, body: dict | None) -> dict | None:
    """The body with ``exo.dev/last-applied-by`` naming who writes it: the token's id and role and
    the client's user agent (what ``exoctl describe`` shows as the last writer)."""
    who = principal(request)
    if body is None or who is None:
        return body
    agent = "".join(c for c in request.headers.get("User-Agent", "") if c.isprintable())[:MAX_AGENT]
    meta = dict(body.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}),
                           LAST_WRITER: f"token {who.id} ({who.role})" + (f"; {agent}" if agent else "")}
    return {**body, "metadata": meta}


def _canonical(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def _refuse(request: web.Request, code: int, message: str) -> web.StreamResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="exo"'} if code == 401 else {}
    if is_openai_path(request.path):
        return openai_error_response(code, message, code="invalid_api_key" if code == 401 else "forbidden",
                                     headers=headers)
    if request.path in OLLAMA_PATHS:
        return ollama_error_response(code, message, headers=headers)
    raise ApiError(code, message, reason="Unauthorized" if code == 401 else "Forbidden", headers=headers)


def auth_middleware(root: str, *, clock: Callable[[], float] = time.time) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Authenticate (token or root secret) and check the route's role from ``ROUTE_ROLES``."""
    if not root:
        raise ValueError("an API token is required")

    @web.middleware
    async def check_role(request: web.Request, handler: Handler) -> web.StreamResponse:
        canonical = _canonical(request)
        if canonical is None:   # no route (404/405): under the API prefixes, still a credential first
            role = AUTHENTICATED if any(request.path == p or request.path.startswith(p + "/")
                                        for p in PROTECTED_PREFIXES) else PUBLIC
        else:
            role = required_role(request.method, canonical)
        if role == PUBLIC:
            return await handler(request)
        try:
            who = authenticate(request, root=root, clock=clock)
        except AuthError as error:
            if role == MEMBER:   # member routes check their own proof
                return await handler(request)
            return _refuse(request, error.code, error.message)
        if who is not None:
            request[PRINCIPAL] = who
        if role == MEMBER:
            return await handler(request)
        if who is None:
            hint = "; in Prometheus, authorization.credentials_file" if canonical in ("/metrics", "/sd") else ""
            return _refuse(request, 401, "Unauthorized: send Authorization: Bearer <token> (a role token from "
                                         f"exoctl token create){hint}")
        if not who.may(role):
            return _refuse(request, 403, f'forbidden: {request.method} {canonical} needs role "{role}" '
                                         f'(or admin); token {who.id} has role "{who.role}"')
        return await handler(request)
    return check_role
