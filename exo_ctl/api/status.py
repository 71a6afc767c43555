"""Kubernetes ``Status`` objects: the body of every API error."""
from __future__ import annotations

from typing import Any

from exo_ctl.api.validation import Cause

REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    409: "Conflict", 410: "Gone", 413: "RequestEntityTooLarge", 415: "UnsupportedMediaType",
    422: "Invalid", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}


def status_object(code: int, message: str, *, reason: str | None = None, kind: str | None = None,
                  name: str | None = None, causes: list[Cause] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason or REASONS.get(code, "Unknown"), "code": code,
    }
    details: dict[str, Any] = {}
    if name:
        details["name"] = name
    if kind:
        details["kind"] = kind
    if causes:
        details["causes"] = [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes]
    if details:
        body["details"] = details
    return body
