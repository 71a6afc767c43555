"""The scheduler (on the Raft leader): turns each ModelDeployment into Shard objects and keeps
them placed as nodes come and go, then summarizes the shards into the deployment's status.

Level-triggered: every pass reads deployments, nodes and shards, asks the pure ``place`` for the
layout, and writes only the differences. It runs on any change to those kinds (a node turning
NotReady, a node joining, a spec change, a delete) and on a slow resync.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from exo_ctl.api.resources import ModelDeployment, Node, Shard
from reconciler.controllers.deployment_status import deployment_status
from reconciler.controllers.manager import Controller
from reconciler.models.catalog import resolve_profile
from reconciler.models.metadata import ModelMetadataError, ModelProfile
from reconciler.scheduler.placement import PlacementPlan, deployment_key, place
from reconciler.store.base import Store, StoreError, make_command, utcnow_iso

log = logging.getLogger(__name__)
PROFILE_RETRY_SECONDS = 5.0


def shard_name(deployment: ModelDeployment, replica: int, index: int) -> str:
    meta = deployment.metadata
    base = meta.name if meta.namespace in (None, "default") else f"{meta.name}.{meta.namespace}"
    return f"{base}-r{replica}-s{index}"


def desired_shards(deployment: ModelDeployment, plan: PlacementPlan) -> dict[str, dict[str, Any]]:
    """Shard objects (name → body) for every assignment of the plan."""
    out = {}
    for assignment in plan.assignments:
        name = shard_name(deployment, assignment.replica, assignment.index)
        out[name] = {
            "apiVersion": "exo.dev/v1alpha1", "kind": "Shard",
            "metadata": {"name": name, "labels": {
                "exo.dev/deployment": deployment.metadata.name,
                "exo.dev/namespace": deployment.metadata.namespace or "default",
                "exo.dev/node": assignment.node}},
            "spec": assignment.to_spec(deployment).model_dump(mode="json", exclude_none=True),
        }
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class SchedulerController(Controller):
    name = "scheduler"
    watches = ("ModelDeployment", "Node", "Shard")
    leader_only = True
    resync_seconds = 30.0

    def __init__(self, *, store: Store, clock: Callable[[], float] = time.monotonic,
                 profile_resolver: Callable[..., ModelProfile] = resolve_profile) -> None:
        self.store = store
        self.clock = clock
        self.resolve = profile_resolver
        self._profiles: dict[tuple[str, str | None, str | None], tuple[float, ModelProfile | str]] = {}

    def stop(self) -> None:
        self._profiles.clear()

    def profile(self, deployment: ModelDeployment) -> ModelProfile | str:
        """The model's profile, or why it cannot be read (retried after a few seconds)."""
        model = deployment.spec.model
        key = (model.source, model.dtype, model.revision)
        cached = self._profiles.get(key)
        if cached and (isinstance(cached[1], ModelProfile) or self.clock() - cached[0] < PROFILE_RETRY_SECONDS):
            return cached[1]
        try:
            result: ModelProfile | str = self.resolve(model.source, dtype=model.dtype, revision=model.revision)
        except ModelMetadataError as error:
            result = str(error)
        self._profiles[key] = (self.clock(), result)
        return result

    async def reconcile(self) -> None:
        deployments, _ = self.store.list("ModelDeployment")
        nodes = [Node.model_validate(n) for n in self.store.list("Node")[0]]
        shard_objects, _ = self.store.list("Shard")
        shards = [Shard.model_validate(s) for s in shard_objects]
        live_keys = set()
        for raw in deployments:
            deployment = ModelDeployment.model_validate(raw)
            live_keys.add((deployment_key(deployment), deployment.metadata.uid))
            await self._reconcile_one(raw, deployment, nodes, shards)
        # Garbage-collect shards whose deployment is gone (or was deleted and recreated).
        for shard in shards:
            if (shard.spec.deployment, shard.spec.deploymentUid) not in live_keys:
                await self._delete_shard(shard.metadata.name)

    async def _reconcile_one(self, raw: dict[str, Any], deployment: ModelDeployment,
                             nodes: list[Node], shards: list[Shard]) -> None:
        key, uid = deployment_key(deployment), deployment.metadata.uid
        ours = {s.metadata.name: s for s in shards if s.spec.deployment == key and s.spec.deploymentUid == uid}
        problem: tuple[str, str] | None = None
        profile = self.profile(deployment)
        if isinstance(profile, str):
            problem, desired = ("ModelNotFound", profile), {}
        else:
            plan = place(deployment=deployment, nodes=nodes, shards=shards, profile=profile)
            desired = desired_shards(deployment, plan)
            if not plan.schedulable:
                problem = ("Unschedulable", plan.reason or "cannot be placed")
        if problem is None or desired:
            await self._converge(desired, ours)
        shards_now = [s for s in self.store.list("Shard")[0]
                      if s["spec"]["deployment"] == key and s["spec"].get("deploymentUid") == uid]
        live = self.store.get(("ModelDeployment", deployment.metadata.namespace or "default", deployment.metadata.name))
        if live is None:
            return
        api_urls = {n.metadata.name: f"http://{n.spec.address}:{n.spec.apiPort}" for n in nodes}
        status = deployment_status(deployment=live, shards=shards_now, problem=problem, now=utcnow_iso(),
                                   api_urls=api_urls)
        if not _same(status, live.get("status")):
            try:
                await self.store.submit(make_command(
                    "status", ("ModelDeployment", live["metadata"]["namespace"], live["metadata"]["name"]),
                    body={"status": status}, expected_rv=live["metadata"]["resourceVersion"]))
            except StoreError as error:
                if error.code not in (404, 409):
                    raise  # 404/409: it changed under us; the next pass (already woken) sees it

    async def _converge(self, desired: dict[str, dict[str, Any]], ours: dict[str, Shard]) -> None:
        for name, body in desired.items():
            current = ours.get(name)
            if current is None:
                log.info("scheduling shard %s on %s (layers %s)", name, body["spec"]["nodeName"],
                         body["spec"]["layers"])
                try:
                    await self.store.submit(make_command("create", ("Shard", "", name), body=body))
                except StoreError as error:
                    if error.code != 409:
                        raise
            elif not _same(current.spec.model_dump(mode="json", exclude_none=True), body["spec"]) \
                    or current.metadata.labels != body["metadata"]["labels"]:
                log.info("moving shard %s to %s (layers %s)", name, body["spec"]["nodeName"], body["spec"]["layers"])
                await self.store.submit(make_command("replace", ("Shard", "", name), body=body,
                                                     expected_rv=current.metadata.resourceVersion))
        for name in ours.keys() - desired.keys():
            await self._delete_shard(name)

    async def _delete_shard(self, name: str) -> None:
        log.info("deleting shard %s", name)
        try:
            await self.store.submit(make_command("delete", ("Shard", "", name)))
        except StoreError as error:
            if error.code != 404:
                raise
