"""Query parameters and headers of API requests, checked with errors that name the parameter."""
from __future__ import annotations

import re

from aiohttp import web

from reconciler.server.errors import ApiError
from exo_ctl.api.selectors import Selector, SelectorError, parse_selector

OP_ID_HEADER = "X-Exo-Op-Id"
_OP_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def watch_requested(request: web.Request) -> bool:
    value = request.query.get("watch", "").lower()
    if value in ("", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise ApiError(400, f"query parameter watch: must be true, false, 1 or 0, got {value!r}")


def dry_run(request: web.Request) -> bool:
    values = request.query.getall("dryRun", [])
    if not values:
        return False
    if all(value == "All" for value in values):
        return True
    raise ApiError(400, f"query parameter dryRun: the only supported value is All, got {values[0]!r}")


def resource_version(request: web.Request) -> int | None:
    """The revision a watch starts after; absent, empty or "0" means "from the current state"."""
    value = request.query.get("resourceVersion", "")
    if value in ("", "0"):
        return None
    if not value.isdigit():
        raise ApiError(400, f"query parameter resourceVersion: must be a non-negative integer, got {value!r}")
    return int(value)


def timeout_seconds(request: web.Request) -> float | None:
    value = request.query.get("timeoutSeconds", "")
    if value == "":
        return None
    if not value.isdigit():
        raise ApiError(400, f"query parameter timeoutSeconds: must be a non-negative integer, got {value!r}")
    return float(value)


def label_selector(request: web.Request) -> Selector:
    try:
        return parse_selector(request.query.get("labelSelector"))
    except SelectorError as error:
        raise ApiError(400, f"query parameter labelSelector: {error}") from None


def op_id(request: web.Request) -> str | None:
    """A client-chosen operation id: retrying a write with the same id applies it at most once."""
    value = request.headers.get(OP_ID_HEADER)
    if value is None:
        return None
    if not _OP_ID.match(value):
        raise ApiError(400, f"header {OP_ID_HEADER}: 1 to 128 characters among letters, digits, '.', '_' and '-'")
    return value
