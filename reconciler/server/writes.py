"""Turning request bodies into store commands, and committing them (or, for ``?dryRun=All``,
computing the result on the local replica with the pure state machine)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonpatch
import jsonpointer
from pydantic import ValidationError

from exo_ctl.api.meta import Frozen
from exo_ctl.api.resources import KindInfo
from exo_ctl.api.validation import Cause, InvalidObject, causes_from, normalize
from reconciler.store.base import Store, StoreError, StoreRefused, StoreUnavailable
from reconciler.store.state import Key, apply as apply_command
from reconciler.scheduler.tensor_admission import admit_write
from reconciler.server.errors import ApiError

RETRY_AFTER_S = 2
COMMIT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Target:
    """What the URL names: a kind, and for item paths a namespace ("" when cluster-scoped) and name."""

    info: KindInfo
    namespace: str
    name: str | None = None

    @property
    def key(self) -> Key:
        assert self.name is not None
        return (self.info.kind, self.namespace, self.name)

    @property
    def resource(self) -> str:
        return f"{self.info.plural}.exo.dev"


@dataclass(frozen=True)
class WriteBody:
    object: dict[str, Any]
    expected_rv: str | None
    expected_uid: str | None


def _mapping(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ApiError(400, f"{what} must be a JSON object, got {type(raw).__name__}")
    return raw


def _check_kind(raw: dict[str, Any], target: Target) -> None:
    kind = raw.get("kind")
    if kind is not None and kind != target.info.kind:
        raise ApiError(400, f"the body's kind {kind!r} does not match the URL, which names {target.resource}",
                       kind=target.info.kind, name=target.name)


def _check_identity(meta: dict[str, Any], target: Target, *, fill_name: bool) -> None:
    """The URL's namespace and name win: a body that disagrees is a 400, a body that omits them
    gets them from the URL."""
    if target.info.namespaced:
        namespace = meta.get("namespace")
        if namespace is not None and namespace != target.namespace:
            raise ApiError(400, f"the namespace of the object ({namespace!r}) does not match the namespace "
                           f"on the URL ({target.namespace!r})", kind=target.info.kind, name=target.name)
        meta["namespace"] = target.namespace
    if target.name is not None:
        name = meta.get("name")
        if name is not None and name != target.name:
            raise ApiError(400, f"the name of the object ({name!r}) does not match the name on the URL "
                           f"({target.name!r})", kind=target.info.kind, name=target.name)
        if fill_name:
            meta["name"] = target.name


def object_write(raw: Any, target: Target) -> WriteBody:
    """Validate a create/replace/apply body against the URL; server-set metadata is dropped but
    ``resourceVersion``/``uid`` are kept as preconditions."""
    raw = dict(_mapping(raw, "the request body"))  # only the top level and metadata are changed
    _check_kind(raw, target)
    meta = raw.get("metadata")
    if meta is None:
        meta = {}
    if isinstance(meta, dict):
        meta = raw["metadata"] = dict(meta)
        _check_identity(meta, target, fill_name=True)
    try:
        normalized = normalize(raw)
    except InvalidObject as error:
        raise ApiError.invalid(error) from None
    return WriteBody(normalized, expected_rv=meta.get("resourceVersion"), expected_uid=meta.get("uid"))


def status_write(raw: Any, target: Target, live: dict[str, Any]) -> WriteBody:
    """Validate a status subresource body: only ``status`` (and the resourceVersion precondition)
    are taken; the rest of the object is left as it is."""
    raw = _mapping(raw, "the request body")
    _check_kind(raw, target)
    meta = raw.get("metadata")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ApiError(400, "metadata must be a JSON object")
    _check_identity(dict(meta), target, fill_name=False)
    if "status" not in raw:
        raise ApiError(422, f'{target.info.kind} "{target.name}" is invalid: status: required field is missing',
                       kind=target.info.kind, name=target.name,
                       causes=[Cause("status", "required field is missing", "FieldValueRequired")])
    candidate = {k: v for k, v in live.items() if k != "status"}
    if raw["status"] is not None:
        candidate["status"] = raw["status"]
    try:
        normalized = normalize(candidate, keep_server_fields=True)
    except InvalidObject as error:
        raise ApiError.invalid(error) from None
    rv = meta.get("resourceVersion")
    if rv is not None and not isinstance(rv, str):
        raise ApiError(422, "metadata.resourceVersion: must be a string", kind=target.info.kind, name=target.name,
                       causes=[Cause("metadata.resourceVersion", "must be a string")])
    return WriteBody({"status": normalized.get("status")}, expected_rv=rv, expected_uid=None)


class Preconditions(Frozen):
    resourceVersion: str | None = None
    uid: str | None = None


class DeleteOptions(Frozen):
    apiVersion: str | None = None
    kind: str | None = None
    preconditions: Preconditions | None = None
    propagationPolicy: str | None = None
    gracePeriodSeconds: int | None = None
    dryRun: list[str] | None = None


def delete_options(raw: Any) -> DeleteOptions:
    if raw is None:
        return DeleteOptions()
    try:
        return DeleteOptions.model_validate(_mapping(raw, "DeleteOptions"))
    except ValidationError as error:
        causes = causes_from(error)
        raise ApiError(400, "invalid DeleteOptions: " + "; ".join(str(c) for c in causes), causes=causes) from None


async def commit(store: Store, command: dict[str, Any], *, target: Target, dry_run: bool) -> dict[str, Any]:
    """The result of ``command``: committed through the store, or computed without committing."""
    try:
        await admit_write(command, store=store)  # tensor ranks a model's family cannot be sharded over: refused here
    except InvalidObject as error:
        raise ApiError.invalid(error) from None
    if dry_run:
        _, result = apply_command(store.state, command)
        if not result.get("ok"):
            raise ApiError(result["code"], result["message"], reason=result["reason"],
                           kind=target.info.kind, name=target.name)
        return result
    try:
        return await store.submit(command, timeout=COMMIT_TIMEOUT_S)
    except StoreError as error:
        raise ApiError(error.code, error.message, reason=error.reason, kind=target.info.kind, name=target.name) from None
    except StoreRefused as error:
        raise ApiError(503, f"this node refuses writes now, nothing was applied: {error}; retry later or through "
                       "another node", headers={"Retry-After": str(RETRY_AFTER_S), "X-Exo-Op-Id": command["opId"]}) from None
    except StoreUnavailable as error:
        if not store.has_quorum:
            raise ApiError(503, f"the cluster has no quorum, so nothing can be written now ({error}); retry later "
                           f"with the same X-Exo-Op-Id ({command['opId']})",
                           headers={"Retry-After": str(RETRY_AFTER_S), "X-Exo-Op-Id": command["opId"]}) from None
        raise ApiError(504, f"the write was not confirmed in time ({error}); its outcome is unknown: retry with "
                       f"the same X-Exo-Op-Id ({command['opId']}) to apply it at most once",
                       headers={"X-Exo-Op-Id": command["opId"]}) from None


# --- patches -----------------------------------------------------------------------------------

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PATCH_TYPES = (MERGE_PATCH, STRATEGIC_PATCH, JSON_PATCH)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (our types have no list merge keys, so strategic merge is this too)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            raise ApiError(400, f"strategic merge directive {key!r} is not supported: lists of exo.dev kinds are "
                           "replaced whole; send the list as it should be")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def patched(live: dict[str, Any], media: str, patch: Any) -> dict[str, Any]:
    """``live`` with ``patch`` applied, or a 422 naming the failed operation."""
    if media == JSON_PATCH:
        if not isinstance(patch, list):
            raise ApiError(400, f"a JSON patch ({JSON_PATCH}) must be a JSON array of operations, "
                           f"got {type(patch).__name__}")
        try:
            result = jsonpatch.JsonPatch(patch).apply(live)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
            raise ApiError(422, f"the JSON patch could not be applied: {error}") from None
        except (TypeError, KeyError, AttributeError) as error:
            raise ApiError(400, f"invalid JSON patch operation: {error}") from None
        return _mapping(result, "the patched object")
    return _mapping(merge_patch(live, _mapping(patch, "a merge patch")), "the patched object")
