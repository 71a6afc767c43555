"""Turn untrusted JSON/YAML objects into validated resources, with errors that name field paths."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from exo_ctl.api.meta import API_VERSION
from exo_ctl.api.resources import DEFAULT_NAMESPACE, KINDS, KindInfo


@dataclass(frozen=True)
class Cause:
    field: str
    message: str
    reason: str = "FieldValueInvalid"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidObject(ValueError):
    """An object failed validation; ``causes`` name each bad field."""

    def __init__(self, summary: str, causes: list[Cause], *, kind: str | None = None, name: str | None = None):
        self.summary, self.causes, self.kind, self.name = summary, causes, kind, name
        super().__init__(self.describe())

    def describe(self) -> str:
        if not self.causes:
            return self.summary
        return self.summary + ": " + "; ".join(str(c) for c in self.causes)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"must be {expected}, got {error.get('input')!r}"
    message = error["msg"]
    return message.removeprefix("Value error, ")


def causes_from(error: ValidationError) -> list[Cause]:
    causes = []
    for item in error.errors():
        reason = {"missing": "FieldValueRequired", "extra_forbidden": "FieldValueNotSupported"}.get(item["type"], "FieldValueInvalid")
        # Drop pydantic's union/function markers from the path (e.g. 'str', 'int', 'function-after[...]').
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int"))))
        causes.append(Cause(_path(loc), _message(item), reason))
    return causes


def resolve_kind(obj: Any) -> KindInfo:
    if not isinstance(obj, dict):
        raise InvalidObject("object must be a mapping", [Cause("", f"got {type(obj).__name__}")])
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not api_version:
        raise InvalidObject("invalid object", [Cause("apiVersion", "required field is missing", "FieldValueRequired")])
    if not kind:
        raise InvalidObject("invalid object", [Cause("kind", "required field is missing", "FieldValueRequired")])
    if api_version != API_VERSION:
        raise InvalidObject(f'no matches for kind "{kind}" in version "{api_version}"',
                            [Cause("apiVersion", f"must be {API_VERSION}", "FieldValueNotSupported")])
    info = KINDS.get(kind)
    if info is None:
        raise InvalidObject(f'no matches for kind "{kind}" in version "{api_version}"',
                            [Cause("kind", f"must be one of {', '.join(KINDS)}", "FieldValueNotSupported")])
    return info


SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp", "managedFields")


def normalize(obj: Any, *, keep_server_fields: bool = False) -> dict[str, Any]:
    """Validate an object of any known kind and return its canonical JSON form (defaults filled,
    namespace set for namespaced kinds, server-set metadata dropped unless asked to keep it)."""
    info = resolve_kind(obj)
    name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), dict) else None
    try:
        model = info.model.model_validate(obj)
    except ValidationError as error:
        label = f'{info.kind} "{name}"' if name else info.kind
        raise InvalidObject(f"{label} is invalid", causes_from(error), kind=info.kind, name=name) from None
    data = model.model_dump(mode="json", exclude_none=True)
    meta = data["metadata"]
    if info.namespaced:
        meta["namespace"] = meta.get("namespace") or DEFAULT_NAMESPACE
    elif meta.get("namespace"):
        raise InvalidObject(f'{info.kind} "{name}" is invalid',
                            [Cause("metadata.namespace", f"{info.kind} is cluster-scoped and takes no namespace")],
                            kind=info.kind, name=name)
    if not keep_server_fields:
        for field in SERVER_FIELDS:
            meta.pop(field, None)
        if info.user_writable:
            data.pop("status", None)
    return data
