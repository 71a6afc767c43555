"""Role tokens: minted, listed and revoked under ``/admin/v1/tokens`` (admin only, see auth.py).

A token is ``exo_<id>_<random>`` (256 random bits); the replicated state keeps only its SHA-256
as an ``ApiToken`` object (cluster-scoped, never served under /apis), with its role, description,
expiry and whether it is revoked. The raw token is returned once, by the create call.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from exo_ctl.api.meta import API_VERSION
from reconciler.server.auth import ROLES, TOKEN_KIND, TOKEN_PREFIX, principal, token_refusal, token_sha256
from reconciler.server.errors import ApiError
from reconciler.server.keys import STORE
from reconciler.server.writes import COMMIT_TIMEOUT_S, RETRY_AFTER_S
from reconciler.store.base import Store, StoreError, StoreUnavailable, make_command

log = logging.getLogger(__name__)

TOKENS_PATH = "/admin/v1/tokens"
TOKEN_PATH = TOKENS_PATH + "/{id}"
MAX_DESCRIPTION = 256
MAX_TTL_S = 10 * 365 * 86400


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_token(*, role: str, description: str, ttl_s: int | None, now: float, created_by: str,
              randbytes: Callable[[int], str] = secrets.token_urlsafe) -> tuple[str, dict[str, Any]]:
    """(the raw token, the ApiToken object holding only its hash)."""
    ident = secrets.token_hex(6)
    raw = f"{TOKEN_PREFIX}{ident}_{randbytes(32)}"
    spec = {"role": role, "description": description, "sha256": token_sha256(raw),
            "expires": iso(now + ttl_s) if ttl_s else None, "revoked": False, "createdBy": created_by}
    return raw, {"apiVersion": API_VERSION, "kind": TOKEN_KIND, "metadata": {"name": ident}, "spec": spec}


def token_view(obj: dict[str, Any], *, now: float) -> dict[str, Any]:
    """What list and get show: everything but the hash."""
    spec = obj.get("spec", {})
    return {"id": obj["metadata"]["name"], "role": spec.get("role"), "description": spec.get("description", ""),
            "created": obj["metadata"].get("creationTimestamp"), "expires": spec.get("expires"),
            "revoked": bool(spec.get("revoked")), "state": token_refusal(spec, now=now) or "active",
            "createdBy": spec.get("createdBy")}


def parse_create(raw: Any) -> tuple[str, str, int | None]:
    """(role, description, ttl seconds or None) from ``{"role", "description"?, "ttlSeconds"?}``."""
    if not isinstance(raw, dict):
        raise ApiError(400, f"body: must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"role", "description", "ttlSeconds"})
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field (expected role, description, ttlSeconds)")
    role = raw.get("role")
    if role not in ROLES:
        raise ApiError(422, f"role: must be one of {', '.join(ROLES)}, got {role!r}")
    description = raw.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise ApiError(422, f"description: must be a string of at most {MAX_DESCRIPTION} characters")
    ttl = raw.get("ttlSeconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_S):
        raise ApiError(422, f"ttlSeconds: must be a whole number of seconds in 1..{MAX_TTL_S}, got {ttl!r}")
    return role, description, ttl


async def _submit(request: web.Request, command: dict[str, Any]) -> dict[str, Any]:
    try:
        return await request.config_dict[STORE].submit(command, timeout=COMMIT_TIMEOUT_S)
    except StoreError as error:
        raise ApiError(error.code, error.message, reason=error.reason) from None
    except StoreUnavailable as error:
        raise ApiError(503, f"the token change could not be committed: {error}; retry",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def add_token_routes(app: web.Application, *, clock: Callable[[], float] = time.time) -> None:
    async def create(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            raise ApiError(400, "body: not valid JSON") from None
        role, description, ttl = parse_create(body)
        who = principal(request)
        raw, obj = new_token(role=role, description=description, ttl_s=ttl, now=clock(),
                             created_by=who.id if who else "")
        result = await _submit(request, make_command("create", (TOKEN_KIND, "", obj["metadata"]["name"]), body=obj))
        return web.json_response({**token_view(result["object"], now=clock()), "token": raw}, status=201)

    async def list_tokens(request: web.Request) -> web.Response:
        items, revision = request.config_dict[STORE].list(TOKEN_KIND)
        return web.json_response({"kind": "TokenList", "metadata": {"resourceVersion": str(revision)},
                                  "items": [token_view(obj, now=clock()) for obj in items]})

    def live(request: web.Request) -> dict[str, Any]:
        ident = request.match_info["id"]
        obj = request.config_dict[STORE].get((TOKEN_KIND, "", ident))
        if obj is None:
            raise ApiError(404, f'token "{ident}" not found', kind="tokens", name=ident)
        return obj

    async def get_token(request: web.Request) -> web.Response:
        return web.json_response(token_view(live(request), now=clock()))

    async def revoke(request: web.Request) -> web.Response:
        obj = live(request)
        if obj["spec"].get("revoked"):
            return web.json_response(token_view(obj, now=clock()))
        body = {**obj, "spec": {**obj["spec"], "revoked": True, "revokedAt": iso(clock())}}
        command = make_command("replace", (TOKEN_KIND, "", obj["metadata"]["name"]), body=body,
                               expected_rv=obj["metadata"]["resourceVersion"])
        result = await _submit(request, command)
        return web.json_response(token_view(result["object"], now=clock()))

    app.router.add_get(TOKENS_PATH, list_tokens)
    app.router.add_post(TOKENS_PATH, create)
    app.router.add_get(TOKEN_PATH, get_token)
    app.router.add_delete(TOKEN_PATH, revoke)


FIRST_TOKENS = {"admin": "admin-token", "inference": "inference-token"}


async def mint_first_tokens(store: Store, data_dir: Path, *, clock: Callable[[], float] = time.time,
                            attempts: int = 60) -> dict[str, Path]:
    """On a new cluster's first node: an admin and an inference token, each in a 0600 file of the
    data dir (what the first-start message points at), so clients never need the secret."""
    written: dict[str, Path] = {}
    for role, filename in FIRST_TOKENS.items():
        path = data_dir / filename
        for attempt in range(attempts):
            raw, obj = new_token(role=role, description=f"made at the cluster's first start ({role})",
                                 ttl_s=None, now=clock(), created_by="first-start")
            try:
                await store.submit(make_command("create", (TOKEN_KIND, "", obj["metadata"]["name"]), body=obj))
                break
            except StoreUnavailable:
                await asyncio.sleep(0.5)
        else:
            log.warning("could not mint the first %s token; use exoctl token create with the cluster secret", role)
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(raw + "\n")
        written[role] = path
        log.info("wrote the first %s token to %s", role, path)
    return written
