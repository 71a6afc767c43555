"""Every node writes its own Node object (address, ports, capacity, the models it holds on disk)
and renews its Lease through the store about once a second; the leader's node-lifecycle
controller judges liveness from it. The models held (``status.cachedModels``, from a callable
the node's weight supply answers) are looked at on every renewal and written only when they
change, so a quiet node adds no Raft writes."""
from __future__ import annotations

import asyncio
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from pydantic import ValidationError

from exo_ctl.api.resources import CachedModel

from reconciler.controllers.node_lifecycle import LEASE
from reconciler.store.base import Store, StoreError, StoreUnavailable, make_command, utcnow_iso

log = logging.getLogger(__name__)
API_VERSION = "exo.dev/v1alpha1"


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    node_id: str
    address: str
    api_port: int
    raft_port: int
    data_port: int
    api_scheme: str = "http"  # https when the node serves its API over TLS (exo --tls)
    labels: dict[str, str] = field(default_factory=dict)
    memory_override: int | None = None   # --memory: what this node advertises
    version: str = ""
    compute: dict[str, Any] = field(default_factory=dict)  # NodeCompute: dtype and BLAS measured at start


def chip_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capacity(identity: NodeIdentity, *, available_at_start: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(capacity, allocatable). Allocatable is fixed when the node starts (the memory free then),
    not re-read later: the shards this node loads must not shrink what the scheduler may place
    here, or every load would look like a reason to move. ``--memory`` sets both."""
    total = identity.memory_override or psutil.virtual_memory().total
    available = identity.memory_override or min(available_at_start, total)
    common = {"cpu": os.cpu_count() or 1, "chip": chip_name(),
              "dtypes": ["bfloat16", "float16", "float32", "4bit", "8bit"]}
    # Round to MiB so small fluctuations of free memory don't rewrite the Node every renewal.
    mib = 1024 * 1024
    return ({**common, "memory": total // mib * mib}, {**common, "memory": available // mib * mib})


def node_object(identity: NodeIdentity) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION, "kind": "Node",
        "metadata": {"name": identity.name, "labels": {
            "exo.dev/hostname": platform.node().lower()[:63] or "unknown",
            "exo.dev/arch": platform.machine().lower(), **identity.labels}},
        "spec": {"nodeId": identity.node_id, "address": identity.address, "apiPort": identity.api_port,
                 "raftPort": identity.raft_port, "dataPort": identity.data_port,
                 "apiScheme": identity.api_scheme},
    }


class NodeRegistrar:
    """Keeps this node's Node object current and its Lease renewed."""

    def __init__(self, *, store: Store, identity: NodeIdentity, lease_interval: float = 1.0,
                 status_interval: float = 10.0, cached_models: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.store, self.identity = store, identity
        self.lease_interval, self.status_interval = lease_interval, status_interval
        self.cached_models = cached_models
        self._models: list[dict[str, Any]] | None = None  # what status.cachedModels was last written as
        self._task: asyncio.Task | None = None
        self.renewals = 0
        self.available_at_start = psutil.virtual_memory().available

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="node-registrar")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_status = float("-inf")
        while True:
            try:
                models = await self._held_models()
                if loop.time() - last_status >= self.status_interval or models != self._models \
                        or self.store.get(("Node", "", self.identity.name)) is None:
                    await self.register(models=models)
                    last_status = loop.time()
                await self.renew_lease()
            except (StoreUnavailable, StoreError) as error:
                log.debug("node registration: %s", error)
            except Exception:
                log.exception("node registration failed")
            await asyncio.sleep(self.lease_interval)

    async def _held_models(self) -> list[dict[str, Any]] | None:
        """The CachedModel dicts of this node now (None without a source of them). Off the event
        loop: the weight supply reads its cache directory's records."""
        if self.cached_models is None:
            return None
        try:
            listed = await asyncio.to_thread(self.cached_models)
        except Exception:  # noqa: BLE001 — the lease must be renewed whatever the cache does
            log.exception("node registration: listing the cached models failed")
            return self._models
        models = []
        for entry in listed:
            try:  # what every reader of Node validates: one bad entry must not make the Node unreadable
                models.append(CachedModel.model_validate(entry).model_dump(mode="json", exclude_none=True))
            except ValidationError as error:
                log.warning("node registration: not listing cached model %r: %s", entry, error.errors()[0]["msg"])
        return sorted(models, key=lambda m: m["name"])

    async def register(self, *, models: list[dict[str, Any]] | None = None) -> None:
        """Create or update the Node: spec and labels from flags, capacity measured now, the
        models held (``models``, when known); the leader-owned parts of status (conditions,
        role) are kept."""
        key = ("Node", "", self.identity.name)
        desired = node_object(self.identity)
        live = self.store.get(key)
        if live is not None and live["spec"].get("unschedulable"):
            desired["spec"]["unschedulable"] = True  # set by an admin (cordon): the node never clears it
        if live is None:
            try:
                live = (await self.store.submit(make_command("create", key, body=desired)))["object"]
            except StoreError as error:
                if error.code != 409:
                    raise
                live = self.store.get(key)
        elif live["spec"] != desired["spec"] or live["metadata"].get("labels") != desired["metadata"]["labels"]:
            body = {**desired, "metadata": {**desired["metadata"], "annotations": live["metadata"].get("annotations", {})}}
            live = (await self.store.submit(make_command("replace", key, body=body,
                                                         expected_rv=live["metadata"]["resourceVersion"])))["object"]
        cap, alloc = capacity(self.identity, available_at_start=self.available_at_start)
        for attempt in range(3):
            # The leader writes conditions/role into the same status: on a conflict, re-read
            # and retry at once, so a new Node does not sit without capacity until next time.
            status = dict(live.get("status") or {})
            wanted = {**status, "capacity": cap, "allocatable": alloc, "version": self.identity.version,
                      **({"compute": self.identity.compute} if self.identity.compute else {}),
                      **({"cachedModels": models} if models is not None else {})}
            if wanted == status:
                self._models = models
                return
            try:
                await self.store.submit(make_command("status", key, body={"status": wanted},
                                                     expected_rv=live["metadata"]["resourceVersion"]))
                self._models = models
                return
            except StoreError as error:
                fresh = self.store.get(key)
                if error.code != 409 or fresh is None or attempt == 2:
                    raise
                live = fresh

    async def renew_lease(self) -> None:
        key = (LEASE, "", self.identity.name)
        body = {"apiVersion": "coordination.exo.dev/v1", "kind": LEASE,
                "metadata": {"name": self.identity.name},
                "spec": {"holderIdentity": self.identity.node_id, "renewTime": utcnow_iso(),
                         "renewals": self.renewals + 1}}
        op = "replace" if self.store.get(key) is not None else "create"
        await self.store.submit(make_command(op, key, body=body), timeout=max(1.0, self.lease_interval * 2))
        self.renewals += 1
