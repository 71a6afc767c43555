"""The replicated state machine: a pure ``apply(state, command) -> (state, result)``.

Every replica folds the same committed commands through ``apply`` and so holds the same objects,
revision and watch history. Commands are plain JSON; anything non-deterministic (timestamps,
uids, op ids) is decided by the proposer and carried inside the command.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

HISTORY_LIMIT = 4096      # watch events kept per ring; older resourceVersions answer 410 Gone
LEASE_KIND = "Lease"      # lease renewals get a ring of their own, so they never evict other kinds' events
OP_RESULT_LIMIT = 4096    # op ids remembered so a retried command applies once
LAST_APPLIED = "exo.dev/last-applied-configuration"

Key = tuple[str, str, str]  # (kind, namespace or "", name)
OPS = ("create", "replace", "apply", "status", "delete")


@dataclass(frozen=True)
class Event:
    type: str  # ADDED | MODIFIED | DELETED
    revision: int
    object: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "object": self.object}


@dataclass(frozen=True)
class StoreState:
    # Plain dicts (picklable for PySyncObj's dumps) that ``apply`` never mutates: it copies.
    revision: int = 0
    objects: Mapping[Key, Mapping[str, Any]] = field(default_factory=dict)
    history: tuple[Event, ...] = ()          # events of every kind but leases
    lease_history: tuple[Event, ...] = ()    # events of leases
    op_results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    op_order: tuple[str, ...] = ()

    def history_for(self, kind: str | None = None) -> tuple[Event, ...]:
        """The kept events a watcher of ``kind`` (None: of every kind) sees, ordered by revision."""
        if kind == LEASE_KIND:
            return self.lease_history
        if kind is not None or not self.lease_history:
            return self.history
        return tuple(sorted(self.history + self.lease_history, key=lambda e: e.revision))

    def compacted_revision_for(self, kind: str | None = None) -> int:
        """Watches of ``kind`` (None: of every kind) must start at or after this revision; older ones are Gone."""
        rings = [self.lease_history] if kind == LEASE_KIND else [self.history]
        if kind is None:
            rings.append(self.lease_history)
        return max((ring[0].revision - 1 for ring in rings if len(ring) >= HISTORY_LIMIT), default=0)

    @property
    def compacted_revision(self) -> int:
        return self.compacted_revision_for(None)

    def events_after(self, revision: int, kind: str | None = None) -> list[Event]:
        # Rings are ordered by revision; scan from the end since watchers are usually current.
        rings = [self.lease_history] if kind == LEASE_KIND else [self.history]
        if kind is None:
            rings.append(self.lease_history)
        out: list[Event] = []
        for ring in rings:
            for event in reversed(ring):
                if event.revision <= revision:
                    break
                out.append(event)
        out.sort(key=lambda e: e.revision)
        return out


def fail(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "reason": reason, "message": message}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _user_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a manifest says, without server-set metadata: the last-applied configuration."""
    meta = manifest.get("metadata", {})
    kept = {k: v for k, v in meta.items() if k in ("name", "namespace", "labels", "annotations") and v}
    kept["annotations"] = {k: v for k, v in kept.get("annotations", {}).items() if k != LAST_APPLIED}
    if not kept["annotations"]:
        del kept["annotations"]
    out = {k: v for k, v in manifest.items() if k not in ("metadata", "status")}
    out["metadata"] = kept
    return out


def _merge_map(live: Mapping[str, str], last: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str]:
    """kubectl's three-way merge for labels/annotations: drop what we applied before and no longer
    want, keep what others set, take what the manifest says."""
    merged = {k: v for k, v in live.items() if k not in last or k in new}
    merged.update(new)
    return merged


def _stamp(obj: dict[str, Any], *, revision: int) -> dict[str, Any]:
    obj["metadata"] = {**obj["metadata"], "resourceVersion": str(revision)}
    return obj


def _new_object(command: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    meta = dict(body.get("metadata", {}))
    meta.pop("resourceVersion", None)
    meta.pop("deletionTimestamp", None)
    meta.update(uid=command["uid"], generation=1, creationTimestamp=command["now"])
    obj = {**body, "metadata": meta}
    return obj


def _check_precondition(command: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any] | None:
    expected = command.get("expectedResourceVersion")
    if expected is not None and str(expected) != live["metadata"]["resourceVersion"]:
        return fail(
            409, "Conflict",
            f"the object has been modified: resourceVersion {expected} is stale "
            f"(now {live['metadata']['resourceVersion']}); get the latest version and try again",
        )
    expected_uid = command.get("expectedUid")
    if expected_uid is not None and expected_uid != live["metadata"].get("uid"):
        return fail(409, "Conflict", f"uid precondition failed: the object was recreated (uid {live['metadata'].get('uid')})")
    return None


def _updated(live: Mapping[str, Any], *, spec_body: Mapping[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The live object with a new spec (and other top-level fields) and metadata; generation
    moves only when the spec does."""
    obj = {k: v for k, v in spec_body.items() if k not in ("metadata", "status")}
    if "status" in live:
        obj["status"] = live["status"]
    generation = live["metadata"].get("generation", 1)
    if _canonical(obj.get("spec")) != _canonical(live.get("spec")):
        generation += 1
    obj["metadata"] = {**meta, "generation": generation}
    return obj


def _decide(objects: Mapping[Key, Mapping[str, Any]], key: Key, command: Mapping[str, Any]):
    """Returns (result, new_object or None for delete, event type) or (failure, None, None)."""
    op = command["op"]
    live = objects.get(key)
    body = command.get("object") or {}
    kind, namespace, name = key

    if op == "create":
        if live is not None:
            return fail(409, "AlreadyExists", f'{kind.lower()} "{name}" already exists'), None, None
        return {"ok": True, "action": "created"}, _new_object(command, body), "ADDED"

    if op == "apply":
        last_applied = _user_fields(body)
        annotation = _canonical(last_applied)
        if live is None:
            obj = _new_object(command, body)
            obj["metadata"]["annotations"] = {**obj["metadata"].get("annotations", {}), LAST_APPLIED: annotation}
            return {"ok": True, "action": "created"}, obj, "ADDED"
        if (failure := _check_precondition(command, live)) is not None:
            return failure, None, None
        live_meta = live["metadata"]
        prev_meta = _last_applied(live_meta)["metadata"]
        new_meta = body.get("metadata", {})
        meta = dict(live_meta)
        meta["labels"] = _merge_map(live_meta.get("labels", {}), prev_meta.get("labels", {}), new_meta.get("labels", {}))
        annotations = _merge_map(live_meta.get("annotations", {}), prev_meta.get("annotations", {}), new_meta.get("annotations", {}))
        annotations[LAST_APPLIED] = annotation
        meta["annotations"] = annotations
        if "managedFields" in new_meta:  # computed by the API server (server-side apply)
            meta["managedFields"] = new_meta["managedFields"]
        obj = _updated(live, spec_body=body, meta=meta)
        if _canonical(obj) == _canonical(live):
            return {"ok": True, "action": "unchanged", "object": dict(live)}, None, None
        return {"ok": True, "action": "configured"}, obj, "MODIFIED"

    if live is None:
        return fail(404, "NotFound", f'{kind.lower()} "{name}" not found'), None, None
    if (failure := _check_precondition(command, live)) is not None:
        return failure, None, None

    if op == "replace":
        meta = dict(live["metadata"])
        new_meta = body.get("metadata", {})
        meta["labels"] = dict(new_meta.get("labels", {}))
        meta["annotations"] = dict(new_meta.get("annotations", {}))
        if "managedFields" in new_meta:
            meta["managedFields"] = new_meta["managedFields"]
        obj = _updated(live, spec_body=body, meta=meta)
        if _canonical(obj) == _canonical(live):
            return {"ok": True, "action": "unchanged", "object": dict(live)}, None, None
        return {"ok": True, "action": "replaced"}, obj, "MODIFIED"

    if op == "status":
        obj = {k: v for k, v in live.items() if k != "status"}
        if body.get("status") is not None:
            obj["status"] = body["status"]
        if _canonical(obj) == _canonical(live):
            return {"ok": True, "action": "unchanged", "object": dict(live)}, None, None
        return {"ok": True, "action": "status"}, obj, "MODIFIED"

    if op == "delete":
        obj = dict(live)
        obj["metadata"] = {**live["metadata"], "deletionTimestamp": command["now"]}
        return {"ok": True, "action": "deleted"}, obj, "DELETED"

    return fail(400, "BadRequest", f"unknown operation {op!r}"), None, None


def _is_str_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _malformed(command: Any) -> str | None:
    """What makes a command unusable (every replica refuses it alike), or None."""
    if not isinstance(command, Mapping):
        return f"a command must be an object, got {type(command).__name__}"
    if command.get("op") not in OPS:
        return f"unknown operation {command.get('op')!r}"
    for field, optional in (("kind", False), ("name", False), ("namespace", True), ("opId", True),
                            ("expectedUid", True), ("expectedResourceVersion", True)):
        value = command.get(field)
        if not (isinstance(value, str) and (value or optional)) and not (optional and value is None):
            return f"{field}: must be a {'string' if optional else 'non-empty string'}, got {value!r}"
    for field in ("now", "uid") if command["op"] in ("create", "apply", "delete") else ():
        if not isinstance(command.get(field), str):
            return f"{field}: must be a string, got {command.get(field)!r}"
    body = command.get("object")
    if body is None:
        return "object: required" if command["op"] in ("create", "replace", "apply") else None
    if not isinstance(body, Mapping) or not isinstance(body.get("metadata", {}), Mapping):
        return "object: must be an object whose metadata is an object"
    meta = body.get("metadata", {})
    if not all(_is_str_map(meta.get(field, {})) for field in ("labels", "annotations")):
        return "object.metadata: labels and annotations must map strings to strings"
    return None


def _last_applied(live_meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """The labels and annotations an earlier apply recorded (none when absent or corrupt)."""
    try:
        previous = json.loads(live_meta.get("annotations", {}).get(LAST_APPLIED, "{}"))
    except ValueError:
        return {"metadata": {}}
    meta = previous.get("metadata") if isinstance(previous, dict) else None
    return {"metadata": {k: v for k, v in meta.items() if k in ("labels", "annotations") and _is_str_map(v)}
            if isinstance(meta, dict) else {}}


def apply(state: StoreState, command: Mapping[str, Any]) -> tuple[StoreState, dict[str, Any]]:
    """Fold one committed command into the state. Pure: the same inputs give the same outputs on
    every replica, and the input state is never modified. A malformed command changes nothing."""
    if (problem := _malformed(command)) is not None:
        return state, {**fail(400, "BadRequest", f"malformed command: {problem}"), "revision": state.revision}
    op_id = command.get("opId")
    if op_id and op_id in state.op_results:
        return state, dict(state.op_results[op_id])
    key: Key = (command["kind"], command.get("namespace") or "", command["name"])
    result, obj, event_type = _decide(state.objects, key, command)
    if obj is None:
        return _remember(state, op_id, {**result, "revision": state.revision}), {**result, "revision": state.revision}

    revision = state.revision + 1
    obj = _stamp(obj, revision=revision)
    objects = dict(state.objects)
    if event_type == "DELETED":
        del objects[key]
    else:
        objects[key] = obj
    ring = "lease_history" if key[0] == LEASE_KIND else "history"
    history = getattr(state, ring) + (Event(event_type, revision, obj),)
    if len(history) > HISTORY_LIMIT:
        history = history[-HISTORY_LIMIT:]
    result = {**result, "object": obj, "revision": revision}
    new_state = replace(state, revision=revision, objects=objects, **{ring: history})
    return _remember(new_state, op_id, result), result


def _remember(state: StoreState, op_id: str | None, result: dict[str, Any]) -> StoreState:
    if not op_id:
        return state
    results = dict(state.op_results)
    order = state.op_order + (op_id,)
    results[op_id] = result
    if len(order) > OP_RESULT_LIMIT:
        for old in order[: len(order) - OP_RESULT_LIMIT]:
            results.pop(old, None)
        order = order[-OP_RESULT_LIMIT:]
    return replace(state, op_results=results, op_order=order)
