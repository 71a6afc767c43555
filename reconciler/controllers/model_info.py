"""ModelInfo in the replicated state: one record per deployed (source, revision), so every node
(and every leader after a failover) plans and fetches from the same metadata.

Every node runs a ``ModelInfoPublisher``. For each deployed model without a record, a node that
holds the model on disk writes one from its own copy's headers (fast: no weight byte is read),
then fills in every tensor's sha256 (each weight byte read once, in a thread) so the bytes a peer
serves can be checked. The first writer wins; a 409 means another node was first. Digests are
filled by the node the record came from, or by any node holding the same files when that node is
gone. The scheduler writes the record itself when the leader holds the model (see
``reconciler.controllers.scheduler``), or reads it from the hub.

The leader's ``ModelInfoCollector`` deletes a record that nothing has referred to for a while (no
ModelDeployment asks for the model, no Shard serves it, no Node's status lists a copy), so the
replicated state does not grow with every model ever deployed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from reconciler.controllers.manager import Controller
from reconciler.models.catalog import local_model_dir
from reconciler.models.metadata import ModelMetadataError
from reconciler.models.model_info import (
    MODEL_INFO_KIND,
    ModelInfoSpec,
    info_from_directory,
    model_info_name,
    model_info_object,
)
from reconciler.store.base import Store, StoreError, make_command

log = logging.getLogger(__name__)
RETRY_SECONDS = 30.0  # a copy that could not be read is read again after this long
DEFAULT_RETENTION_SECONDS = 3600.0  # --model-info-retention: an unreferenced record is kept this long

LocalInfo = Callable[..., "ModelInfoSpec | None"]


def local_model_info(source: str, revision: str | None, *, node_name: str, digests: bool) -> ModelInfoSpec | None:
    """The ModelInfo of this node's own copy of (source, revision), None when it has none.
    Blocking (headers; with ``digests`` every weight byte): call it off the event loop."""
    directory = local_model_dir(source, revision=revision)
    if directory is None:
        return None
    return info_from_directory(directory, source=source, revision=revision, origin=f"node/{node_name}",
                               digests=digests)


def stored_model_info(store: Store, source: str, revision: str | None) -> tuple[ModelInfoSpec, dict[str, Any]] | None:
    """(spec, store object) of the ModelInfo of (source, revision) in this replica, if one is there."""
    obj = store.get((MODEL_INFO_KIND, "", model_info_name(source, revision)))
    if obj is None:
        return None
    try:
        return ModelInfoSpec.model_validate(obj.get("spec") or {}), obj
    except ValidationError as error:
        log.warning("ModelInfo %s: not a valid record (%s); ignoring it", obj["metadata"]["name"], error.errors()[0])
        return None


async def create_model_info(store: Store, spec: ModelInfoSpec) -> bool:
    """Write the record; False when another node wrote it first (409)."""
    body = model_info_object(spec)
    try:
        await store.submit(make_command("create", (MODEL_INFO_KIND, "", body["metadata"]["name"]), body=body))
    except StoreError as error:
        if error.code != 409:
            raise
        return False
    log.info("ModelInfo %s: written from %s", body["metadata"]["name"], spec.origin)
    return True


def has_digests(spec: ModelInfoSpec) -> bool:
    return all(t.sha256 for f in spec.weightFiles for t in f.tensors.values())


def same_files(a: ModelInfoSpec, b: ModelInfoSpec) -> bool:
    """Whether two records describe the same files (config and headers; digests aside)."""
    def layout(spec: ModelInfoSpec) -> Any:
        return [(f.name, f.size, f.headerLength, {n: (t.dtype, t.shape, t.start, t.end) for n, t in f.tensors.items()})
                for f in spec.weightFiles]
    return a.config == b.config and layout(a) == layout(b)


def deployed_models(store: Store) -> list[tuple[str, str | None]]:
    """Every (source, revision) some ModelDeployment asks for, each once."""
    found: dict[tuple[str, str | None], None] = {}
    for raw in store.list("ModelDeployment")[0]:
        model = (raw.get("spec") or {}).get("model") or {}
        if isinstance(model.get("source"), str):
            found[(model["source"], model.get("revision"))] = None
    return list(found)


class ModelInfoPublisher(Controller):
    """On every node: publishes the ModelInfo of deployed models this node holds on disk."""

    name = "model-info"
    watches = ("ModelDeployment", "ModelInfo", "Node")
    resync_seconds = RETRY_SECONDS

    def __init__(self, *, store: Store, node_name: str, local_info: LocalInfo = local_model_info,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.node_name = store, node_name
        self.local_info, self.clock = local_info, clock
        self._work: dict[str, asyncio.Task[None]] = {}       # per source: one resolution at a time
        self._failed: dict[tuple[str, str | None], float] = {}  # copies that could not be read, when
        self._hashing = asyncio.Semaphore(1)  # one model's weights are read for digests at a time

    def stop(self) -> None:
        for task in self._work.values():
            task.cancel()
        self._work.clear()

    async def reconcile(self) -> None:
        for source, revision in deployed_models(self.store):
            running = self._work.get(source)
            if running is not None and not running.done():
                continue
            failed = self._failed.get((source, revision))
            if failed is not None and self.clock() - failed < RETRY_SECONDS:
                continue
            stored = stored_model_info(self.store, source, revision)
            if stored is not None and (has_digests(stored[0]) or not self._fills_digests(stored[0])):
                continue
            self._work[source] = asyncio.create_task(self._publish(source, revision),
                                                     name=f"model-info:{model_info_name(source, revision)}")

    def _fills_digests(self, spec: ModelInfoSpec) -> bool:
        """Whether this node completes a record without digests: the node it came from does, or
        anyone once that node is gone (a record from the hub is not this node's to fill)."""
        if not spec.origin.startswith("node/"):
            return False
        origin = spec.origin.removeprefix("node/")
        if origin == self.node_name:
            return True
        node = self.store.get(("Node", "", origin))
        conditions = ((node or {}).get("status") or {}).get("conditions") or []
        return not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    async def _publish(self, source: str, revision: str | None) -> None:
        try:
            if stored_model_info(self.store, source, revision) is None:
                spec = await asyncio.to_thread(self.local_info, source, revision, node_name=self.node_name,
                                               digests=False)
                if spec is None:
                    return
                await create_model_info(self.store, spec)
            stored = stored_model_info(self.store, source, revision)
            if stored is None or has_digests(stored[0]) or not self._fills_digests(stored[0]):
                return
            async with self._hashing:
                full = await asyncio.to_thread(self.local_info, source, revision, node_name=self.node_name,
                                               digests=True)
            if not await self._fill_digests(stored, full):
                self._failed[(source, revision)] = self.clock()  # not read again before RETRY_SECONDS
        except ModelMetadataError as error:
            self._failed[(source, revision)] = self.clock()
            log.warning("ModelInfo of %s: this node's copy cannot be read: %s", source, error)
        except StoreError as error:
            log.info("ModelInfo of %s: %s; trying again on the next pass", source, error)

    async def _fill_digests(self, stored: tuple[ModelInfoSpec, dict[str, Any]], full: ModelInfoSpec | None) -> bool:
        """Replace the record with the digested one; False when this node's copy cannot give it."""
        spec, obj = stored
        if full is None:
            return False
        if not same_files(full, spec):
            log.warning("ModelInfo %s: this node's copy of %s differs from the record (from %s); not adding digests",
                        obj["metadata"]["name"], spec.source, spec.origin)
            return False
        body = {**model_info_object(full.model_copy(update={"commit": spec.commit})),
                "metadata": {"name": obj["metadata"]["name"]}}
        try:
            await self.store.submit(make_command("replace", (MODEL_INFO_KIND, "", obj["metadata"]["name"]), body=body,
                                                 expected_rv=obj["metadata"]["resourceVersion"]))
        except StoreError as error:
            if error.code not in (404, 409):
                raise
            return True  # changed under us (another node filled it): the next pass looks again
        log.info("ModelInfo %s: tensor digests added from this node's copy", obj["metadata"]["name"])
        return True


def model_infos_in_use(store: Store) -> set[str]:
    """Names of the ModelInfo records something refers to: a ModelDeployment's or a Shard's model,
    or a copy some Node lists in status.cachedModels (re-deploying it needs no hub then)."""
    names = {model_info_name(source, revision) for source, revision in deployed_models(store)}
    for raw in store.list("Shard")[0]:
        model = (raw.get("spec") or {}).get("model") or {}
        if isinstance(model.get("source"), str):
            names.add(model_info_name(model["source"], model.get("revision")))
    for raw in store.list("Node")[0]:
        for cached in ((raw.get("status") or {}).get("cachedModels") or []):
            if isinstance(cached, dict) and isinstance(cached.get("name"), str):
                names.add(cached["name"])
    return names


class ModelInfoCollector(Controller):
    """On the leader: deletes each ModelInfo that ``model_infos_in_use`` has not named for
    ``retention`` seconds. The time is this leader's own; a new leader starts counting again, so a
    failover can only keep a record longer. The delete is conditional on the record's
    resourceVersion, so a record rewritten meanwhile (its digests filled) waits another pass."""

    name = "model-info-gc"
    watches = ("ModelDeployment", "Shard", "Node", MODEL_INFO_KIND)
    leader_only = True

    def __init__(self, *, store: Store, retention: float = DEFAULT_RETENTION_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.retention, self.clock = store, retention, clock
        self.resync_seconds = min(30.0, max(0.5, retention / 4))  # a record is deleted soon after its time
        self._unused_since: dict[str, float] = {}

    def stop(self) -> None:
        self._unused_since.clear()

    async def reconcile(self) -> None:
        in_use, now = model_infos_in_use(self.store), self.clock()
        records = self.store.list(MODEL_INFO_KIND)[0]
        present = {record["metadata"]["name"] for record in records}
        self._unused_since = {name: since for name, since in self._unused_since.items()
                              if name in present and name not in in_use}  # a reference restarts the count
        for record in records:
            name = record["metadata"]["name"]
            if name in in_use or now - self._unused_since.setdefault(name, now) < self.retention:
                continue
            try:
                await self.store.submit(make_command("delete", (MODEL_INFO_KIND, "", name),
                                                     expected_rv=record["metadata"]["resourceVersion"]))
            except StoreError as error:
                if error.code not in (404, 409):
                    raise
                continue
            self._unused_since.pop(name, None)
            log.info("ModelInfo %s: deleted; no deployment, shard or node copy has referred to %s for %.0fs",
                     name, (record.get("spec") or {}).get("source", name), self.retention)
