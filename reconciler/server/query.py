"""Query parameters and headers of API requests, checked with errors that name the parameter."""
from __future__ import annotations

import base64
import datetime
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from exo_ctl.api.selectors import Selector, SelectorError, parse_selector
from exo_ctl.api.validation import Cause
from reconciler.server.errors import ApiError

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


# --- field selectors ---------------------------------------------------------------------------

# Fields a fieldSelector may name, per kind (metadata.name and metadata.namespace for every kind).
SELECTABLE_FIELDS = {
    "ModelDeployment": ("spec.model.source", "spec.placement.strategy"),
    "Node": ("spec.address", "status.role"),
    "Shard": ("spec.deployment", "spec.nodeName", "status.phase"),
    "Event": ("involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
              "involvedObject.apiVersion", "reason", "type", "source.component"),
}


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    equal: bool
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        current: Any = obj
        for part in self.path.split("."):
            current = current.get(part) if isinstance(current, Mapping) else None
        text = "" if current is None else str(current)
        return (text == self.value) == self.equal


@dataclass(frozen=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all(r.matches(obj) for r in self.requirements)

    @property
    def is_empty(self) -> bool:
        return not self.requirements


def parse_field_selector(text: str | None, kind: str) -> FieldSelector:
    """``metadata.name=x,status.phase!=Ready``: =, == and != on the fields kubectl uses."""
    if not text:
        return FieldSelector()
    allowed = ("metadata.name", "metadata.namespace", *SELECTABLE_FIELDS.get(kind, ()))
    out = []
    for term in text.split(","):
        term = term.strip()
        for operator in ("!=", "==", "="):
            path, found, value = term.partition(operator)
            if found:
                break
        else:
            raise ApiError(400, f"query parameter fieldSelector: invalid selector {term!r}: expected FIELD=VALUE, "
                           "FIELD==VALUE or FIELD!=VALUE")
        path = path.strip()
        if path not in allowed:
            raise ApiError(400, f'query parameter fieldSelector: field label not supported: "{path}" '
                           f"(supported for {kind}: {', '.join(allowed)})")
        out.append(FieldRequirement(path, operator != "!=", value.strip()))
    return FieldSelector(tuple(out))


def field_selector(request: web.Request, kind: str) -> FieldSelector:
    return parse_field_selector(request.query.get("fieldSelector"), kind)


# --- lists -------------------------------------------------------------------------------------

def limit(request: web.Request) -> int | None:
    value = request.query.get("limit", "")
    if value in ("", "0"):
        return None
    if not value.isdigit():
        raise ApiError(400, f"query parameter limit: must be a non-negative integer, got {value!r}")
    return int(value)


def encode_continue(*, revision: int, after: tuple[str, str]) -> str:
    raw = json.dumps({"rv": revision, "after": list(after)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def continue_after(request: web.Request) -> tuple[str, str] | None:
    """The (namespace, name) a continued list resumes after."""
    token = request.query.get("continue", "")
    if not token:
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        namespace, name = decoded["after"]
        if not isinstance(namespace, str) or not isinstance(name, str):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise ApiError(400, "query parameter continue: not a token this server issued; list again without it") from None
    return namespace, name


def list_resource_version(request: web.Request, current: int) -> None:
    """A list is served from the current state: refuse versions it cannot honour."""
    value = request.query.get("resourceVersion", "")
    match = request.query.get("resourceVersionMatch", "")
    if match not in ("", "NotOlderThan", "Exact"):
        raise ApiError(400, f"query parameter resourceVersionMatch: must be NotOlderThan or Exact, got {match!r}")
    if value in ("", "0"):
        return
    if not value.isdigit():
        raise ApiError(400, f"query parameter resourceVersion: must be a non-negative integer, got {value!r}")
    if int(value) > current:
        # Kubernetes' answer, which client-go's reflectors recognise by the cause and retry.
        raise ApiError(504, f"Too large resource version: {value}, current resource version: {current}",
                       reason="Timeout", headers={"Retry-After": "1"},
                       causes=[Cause("", "Too large resource version", reason="ResourceVersionTooLarge")])
    if match == "Exact" and int(value) != current:
        raise ApiError(410, f"too old resource version: {value} ({current}); only the current state is kept for lists")


def include_object(request: web.Request) -> str:
    value = request.query.get("includeObject", "PartialObjectMetadata")
    if value not in ("None", "Object", "PartialObjectMetadata"):
        raise ApiError(400, f"query parameter includeObject: must be None, Object or PartialObjectMetadata, got {value!r}")
    return value


FIELD_MANAGER_MAX = 128


def field_manager(request: web.Request) -> str:
    """Who owns the fields a write sets: ``fieldManager``, else the User-Agent's product name
    (as Kubernetes does for updates; we accept it for apply too, so older clients keep working)."""
    value = request.query.get("fieldManager")
    if value is None:
        return request.headers.get("User-Agent", "").split("/")[0].strip()[:FIELD_MANAGER_MAX] or "unknown"
    if not value or len(value) > FIELD_MANAGER_MAX or not value.isprintable():
        raise ApiError(422, f"query parameter fieldManager: must be 1 to {FIELD_MANAGER_MAX} printable characters",
                       causes=[Cause("fieldManager", "must be 1 to 128 printable characters")])
    return value


def force(request: web.Request) -> bool:
    value = request.query.get("force", "false")
    if value not in ("true", "false"):
        raise ApiError(400, f"query parameter force: must be true or false, got {value!r}")
    return value == "true"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
