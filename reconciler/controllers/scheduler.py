"""The scheduler (on the Raft leader): turns each ModelDeployment into Shard objects and keeps
them placed as nodes come and go, then summarizes the shards into the deployment's status.

Level-triggered: every pass reads deployments, nodes and shards, asks the pure ``place`` for the
layout, and writes only the differences. It runs on any change to those kinds (a node turning
NotReady, a node joining, a spec change, a delete) and on a slow resync.
"""
from __future__ import annotations

import hashlib
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


MAX_NAME = 253  # a DNS-1123 subdomain


def shard_name(deployment: ModelDeployment, replica: int, index: int) -> str:
    """``NAME-rR-sI`` in the default namespace; elsewhere ``NAME.NAMESPACE-HASH-rR-sI``, where HASH
    (of ``NAMESPACE/NAME``) keeps ``a.b`` in default and ``a`` in ``b`` apart. Too long a name is
    cut and hashed. The scheduler reports the rare clash left (ShardNameConflict) instead of
    taking another deployment's shard."""
    meta = deployment.metadata
    namespace = meta.namespace or "default"
    digest = hashlib.sha256(f"{namespace}/{meta.name}".encode()).hexdigest()[:6]
    suffix = f"-r{replica}-s{index}"
    base = meta.name if namespace == "default" else f"{meta.name}.{namespace}-{digest}"
    if len(base) + len(suffix) > MAX_NAME:
        base = base[:MAX_NAME - len(suffix) - len(digest) - 1].rstrip(".-") + f"-{digest}"
    return base + suffix


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
        # Inputs of each settled deployment, and until when they count as settled.
        self._inputs: dict[tuple[str, str | None], tuple[tuple[Any, ...], float]] = {}
        self._last_full_pass = float("-inf")

    def stop(self) -> None:
        self._profiles.clear()
        self._inputs.clear()

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
        node_objects, _ = self.store.list("Node")
        shard_objects, _ = self.store.list("Shard")
        now = self.clock()
        if now - self._last_full_pass >= self.resync_seconds:
            self._inputs.clear()  # the slow resync looks at everything again
            self._last_full_pass = now
        nodes_version = tuple((n["metadata"]["name"], n["metadata"]["resourceVersion"]) for n in node_objects)
        shard_versions: dict[tuple[str, str | None], list[tuple[str, str]]] = {}
        for shard in shard_objects:
            owner = (shard["spec"]["deployment"], shard["spec"].get("deploymentUid"))
            shard_versions.setdefault(owner, []).append((shard["metadata"]["name"], shard["metadata"]["resourceVersion"]))
        nodes: list[Node] | None = None
        shards: list[Shard] | None = None
        live_keys = set()
        for raw in deployments:
            meta = raw["metadata"]
            owner = (f"{meta['namespace']}/{meta['name']}", meta.get("uid"))
            live_keys.add(owner)
            # Level-triggered, but a deployment whose inputs (itself, the nodes, its shards) have
            # not changed since its last settled pass is skipped: a pass costs O(deployments).
            inputs = (meta["resourceVersion"], nodes_version, tuple(shard_versions.get(owner, ())))
            seen = self._inputs.get(owner)
            if seen is not None and seen[0] == inputs and now < seen[1]:
                continue
            if nodes is None or shards is None:
                nodes = [Node.model_validate(n) for n in node_objects]
                shards = [Shard.model_validate(s) for s in shard_objects]
            settled_until = await self._reconcile_one(raw, ModelDeployment.model_validate(raw), nodes, shards)
            if settled_until is None:
                self._inputs.pop(owner, None)
            else:
                self._inputs[owner] = (inputs, settled_until)
        for owner in list(self._inputs):
            if owner not in live_keys:
                del self._inputs[owner]
        # Garbage-collect shards whose deployment is gone (or was deleted and recreated).
        for shard in shard_objects:
            if (shard["spec"]["deployment"], shard["spec"].get("deploymentUid")) not in live_keys:
                await self._delete_shard(shard["metadata"]["name"])

    async def _reconcile_one(self, raw: dict[str, Any], deployment: ModelDeployment,
                             nodes: list[Node], shards: list[Shard]) -> float | None:
        """Converge one deployment. Returns until when it is settled if nothing had to be written
        (forever, or until a missing model is looked for again), None when it wrote something."""
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
        wrote, conflicts = False, []
        if problem is None or desired:
            wrote, conflicts = await self._converge(desired, ours, key=key)
        if conflicts and problem is None:
            problem = ("ShardNameConflict", "; ".join(conflicts))
        shards_now = [s for s in self.store.list("Shard")[0]
                      if s["spec"]["deployment"] == key and s["spec"].get("deploymentUid") == uid]
        live = self.store.get(("ModelDeployment", deployment.metadata.namespace or "default", deployment.metadata.name))
        if live is None:
            return None
        api_urls = {n.metadata.name: f"http://{n.spec.address}:{n.spec.apiPort}" for n in nodes}
        status = deployment_status(deployment=live, shards=shards_now, problem=problem, now=utcnow_iso(),
                                   api_urls=api_urls)
        if not _same(status, live.get("status")):
            wrote = True
            try:
                await self.store.submit(make_command(
                    "status", ("ModelDeployment", live["metadata"]["namespace"], live["metadata"]["name"]),
                    body={"status": status}, expected_rv=live["metadata"]["resourceVersion"]))
            except StoreError as error:
                if error.code not in (404, 409):
                    raise  # 404/409: it changed under us; the next pass (already woken) sees it
        if wrote:
            return None
        # A model that could not be read, or a shard name taken, is looked at again after a pause.
        retried = problem and problem[0] in ("ModelNotFound", "ShardNameConflict")
        return self.clock() + PROFILE_RETRY_SECONDS if retried else float("inf")

    async def _converge(self, desired: dict[str, dict[str, Any]], ours: dict[str, Shard], *,
                        key: str) -> tuple[bool, list[str]]:
        """Create, move or delete this deployment's shards: whether anything was written, and the
        names that another deployment's shards hold (never overwritten)."""
        wrote, conflicts = False, []
        for name, body in desired.items():
            current = ours.get(name)
            if current is None:
                holder = self._holder(name)
                if holder is not None and holder != key:
                    log.warning("shard name %s is taken by deployment %s; not scheduling it for %s", name, holder, key)
                    conflicts.append(f"shard {name} already belongs to deployment {holder}")
                    continue
                log.info("scheduling shard %s on %s (layers %s)", name, body["spec"]["nodeName"],
                         body["spec"]["layers"])
                wrote = True
                try:
                    await self.store.submit(make_command("create", ("Shard", "", name), body=body))
                except StoreError as error:
                    if error.code != 409:
                        raise
                    # Created under us: ours from an earlier pass (or its old uid, collected soon) or a clash.
                    holder = self._holder(name)
                    log.info("shard %s exists already (deployment %s); looking again on the next pass", name, holder)
                    if holder is not None and holder != key:
                        conflicts.append(f"shard {name} already belongs to deployment {holder}")
            elif not _same(current.spec.model_dump(mode="json", exclude_none=True), body["spec"]) \
                    or current.metadata.labels != body["metadata"]["labels"]:
                log.info("moving shard %s to %s (layers %s)", name, body["spec"]["nodeName"], body["spec"]["layers"])
                wrote = True
                await self.store.submit(make_command("replace", ("Shard", "", name), body=body,
                                                     expected_rv=current.metadata.resourceVersion))
        for name in ours.keys() - desired.keys():
            wrote = True
            await self._delete_shard(name)
        return wrote, conflicts

    def _holder(self, name: str) -> str | None:
        """The NAMESPACE/NAME of the deployment whose shard is called ``name``, if one exists."""
        existing = self.store.get(("Shard", "", name))
        return existing["spec"]["deployment"] if existing is not None else None

    async def _delete_shard(self, name: str) -> None:
        log.info("deleting shard %s", name)
        try:
            await self.store.submit(make_command("delete", ("Shard", "", name)))
        except StoreError as error:
            if error.code != 404:
                raise
