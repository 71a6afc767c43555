"""Field ownership for server-side apply: ``metadata.managedFields`` in Kubernetes' FieldsV1
(``f:`` keys) form. Maps are merged by key; lists and scalars are atomic leaves."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from exo_ctl.api.meta import API_VERSION
from reconciler.server.auth import LAST_WRITER
from reconciler.server.errors import ApiError
from exo_ctl.api.validation import Cause

Path = tuple[str, ...]
APPLY, UPDATE = "Apply", "Update"
BEFORE_FIRST_APPLY = "before-first-apply"
# Annotations the server itself writes (last applied manifest, last writer): nobody owns them.
SERVER_ANNOTATIONS = frozenset({"exo.dev/last-applied-configuration", LAST_WRITER})


def leaves(obj: dict[str, Any]) -> dict[Path, Any]:
    """Every owned field of an object (path → value): labels, annotations and everything but
    metadata/status/apiVersion/kind; an empty map is a leaf of its own."""
    out: dict[Path, Any] = {}

    def walk(value: Any, path: Path) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, (*path, key))
        else:
            out[path] = value

    meta = obj.get("metadata") or {}
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items():
            if not (field == "annotations" and key in SERVER_ANNOTATIONS):
                out[("metadata", field, key)] = value
    for key, value in obj.items():
        if key not in ("metadata", "status", "apiVersion", "kind"):
            walk(value, (key,))
    return out


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree


def from_fields_v1(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, child in tree.items():
        if not key.startswith("f:"):
            continue
        path = (*prefix, key[2:])
        out |= from_fields_v1(child, path) if child else {path}
    return out


@dataclass
class Owner:
    manager: str
    operation: str
    fields: set[Path]
    entry: dict[str, Any] | None  # the stored entry, kept as is (time included) when fields are unchanged

    def render(self, now: str) -> dict[str, Any]:
        if self.entry is not None and from_fields_v1(self.entry.get("fieldsV1") or {}) == self.fields:
            return self.entry
        return {"manager": self.manager, "operation": self.operation, "apiVersion": API_VERSION, "time": now,
                "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(self.fields)}


def owners(live: dict[str, Any] | None) -> list[Owner]:
    if live is None:
        return []
    entries = (live.get("metadata") or {}).get("managedFields")
    if entries is None:  # written before fields were tracked: one owner holds everything
        return [Owner(BEFORE_FIRST_APPLY, UPDATE, set(leaves(live)), None)]
    return [Owner(e["manager"], e["operation"], from_fields_v1(e.get("fieldsV1") or {}), e) for e in entries]


def _overlaps(a: Path, b: Path) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _get(obj: Any, path: Path) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


_MISSING = object()


def _remove(obj: dict[str, Any], path: Path) -> None:
    parents = [obj]
    for key in path[:-1]:
        child = parents[-1].get(key)
        if not isinstance(child, dict):
            return
        parents.append(child)
    parents[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):  # drop maps left empty by the removal
        if parents[depth]:
            break
        parents[depth - 1].pop(path[depth - 1], None)


def _set(obj: dict[str, Any], path: Path, value: Any) -> None:
    for key in path[:-1]:
        child = obj.get(key)
        if not isinstance(child, dict):
            child = obj[key] = {}
        obj = child
    obj[path[-1]] = copy.deepcopy(value)


def _render(all_owners: list[Owner], now: str) -> list[dict[str, Any]]:
    return [o.render(now) for o in all_owners if o.fields]


def conflict_error(*, name: str, kind: str, conflicts: list[tuple[Path, str]]) -> ApiError:
    def dotted(path: Path) -> str:
        return "".join(f"[{json.dumps(k)}]" if ("." in k or "/" in k) else f".{k}" for k in path)
    listed = "\n".join(f'- conflict with "{manager}" using {API_VERSION}: {dotted(path)}' for path, manager in conflicts)
    causes = [Cause(dotted(path), f'conflict with "{manager}" using {API_VERSION}', "FieldManagerConflict")
              for path, manager in conflicts]
    count = len(conflicts)
    message = (f"Apply failed with {count} conflict{'s' if count > 1 else ''}: "
               + ("; ".join(f'conflict with "{m}" using {API_VERSION}: {dotted(p)}' for p, m in conflicts)
                  if count == 1 else "\n" + listed))
    return ApiError(409, message, reason="Conflict", kind=kind, name=name, causes=causes)


def apply(live: dict[str, Any] | None, applied: dict[str, Any], *, manager: str, force: bool, now: str,
          canonical: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The object after ``manager`` applies ``applied`` (the user's manifest, not defaulted) to
    ``live``, and its managedFields; a 409 naming each field another manager set differently.
    Values are taken from ``canonical`` (the validated manifest) where it has them."""
    wanted = {}
    for path, value in leaves(applied).items():
        normal = _get(canonical, path) if canonical is not None else _MISSING
        wanted[path] = value if normal is _MISSING else normal
    all_owners = owners(live)
    base = copy.deepcopy(live) if live is not None else {}
    conflicts: list[tuple[Path, str]] = []
    for owner in all_owners:
        if owner.manager == manager and owner.operation == APPLY:
            continue
        for owned in sorted(owner.fields):
            for path in wanted:
                if _overlaps(owned, path) and _get(base, path) != wanted[path]:
                    conflicts.append((owned, owner.manager))
                    break
    if conflicts and not force:
        meta = applied.get("metadata") or {}
        raise conflict_error(name=meta.get("name", ""), kind=applied.get("kind", ""), conflicts=conflicts)
    taken = {path for path, _ in conflicts}
    for owner in all_owners:
        if not (owner.manager == manager and owner.operation == APPLY):
            owner.fields -= taken
    mine = next((o for o in all_owners if o.manager == manager and o.operation == APPLY), None)
    if mine is None:
        mine = Owner(manager, APPLY, set(), None)
        all_owners.append(mine)
    others = set().union(*(o.fields for o in all_owners if o is not mine))
    for path in mine.fields - set(wanted):
        if not any(_overlaps(path, other) for other in others):
            _remove(base, path)
    mine.fields = set(wanted)
    for path, value in wanted.items():
        _set(base, path, value)
    meta = applied.get("metadata") or {}
    base.setdefault("metadata", {})
    for field in ("name", "namespace"):
        if meta.get(field) is not None:
            base["metadata"][field] = meta[field]
    base.setdefault("apiVersion", applied.get("apiVersion"))
    base.setdefault("kind", applied.get("kind"))
    return base, _render(all_owners, now)


def update(live: dict[str, Any] | None, new: dict[str, Any], *, manager: str, now: str) -> list[dict[str, Any]]:
    """managedFields after a create/replace/patch by ``manager``: it owns what it changed, and a
    removed field is owned by nobody."""
    before = leaves(live) if live is not None else {}
    after = leaves(new)
    changed = {p for p, v in after.items() if before.get(p, _MISSING) != v}
    removed = set(before) - set(after)
    all_owners = owners(live)
    for owner in all_owners:
        owner.fields = {p for p in owner.fields if any(_overlaps(p, a) for a in after)
                        and not any(_overlaps(p, c) for c in changed)}
    mine = next((o for o in all_owners if o.manager == manager and o.operation == UPDATE), None)
    if mine is None:
        mine = Owner(manager, UPDATE, set(), None)
        all_owners.append(mine)
    mine.fields = (mine.fields | changed) - removed
    return _render(all_owners, now)
