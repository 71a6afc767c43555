"""The scheduler (on the Raft leader): turns each ModelDeployment into Shard objects and keeps
them placed as nodes come and go, then summarizes the shards into the deployment's status.

Level-triggered: every pass reads deployments, nodes and shards, asks the pure ``place`` for the
layout, and writes only the differences. It runs on any change to those kinds (a node turning
NotReady, a node joining, a spec change, a delete) and on a slow resync.

Re-placement is make-before-break when every node has room for both: a plan that moves a serving
placement is written as a new placement revision (new Shard names, ``-vN``, and the
``exo.dev/placement-revision`` label) beside the old one, which routes keep using until the new
one is whole and Ready; then the old one is deleted (its streams in flight finish on it). Without
the room, or when the serving placement has lost a node, shards are moved in place as before.

The model's sizes come only from its ModelInfo in the replicated state, so every leader plans
alike after a failover. Without one, the leader writes it from its own copy's headers when it has
the model on disk, else reads it from the Hugging Face hub in the background (one read per source
at a time; the deployment says ResolvingModel meanwhile), else waits for a node that has the
model to publish it (``reconciler.controllers.model_info``), saying so in the Ready condition.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any


from exo_ctl.api.resources import ModelDeployment, Node, Shard, TensorGroup, TensorPeer
from reconciler.controllers.deployment_status import REVISION_LABEL, deployment_status, placement_revision
from reconciler.controllers.manager import Controller
from reconciler.controllers.model_info import (LocalInfo, create_model_info, deployed_models, local_model_info,
                                               stored_model_info)
from reconciler.models.catalog import info_profile, split_refusal_of
from reconciler.models.hub import hub_model_info, hub_usable
from reconciler.models.metadata import ModelMetadataError, ModelProfile
from reconciler.models.model_info import MODEL_INFO_KIND, ModelInfoSpec, model_info_name
from reconciler.runtime.tensor_group import ring_ports, tensor_refusal
from reconciler.scheduler.placement import PlacementPlan, deployment_key, node_is_ready, place, room_for_both
from reconciler.server.events import placement_message, record_event
from reconciler.store.base import Store, StoreError, make_command, utcnow_iso

log = logging.getLogger(__name__)
PROFILE_RETRY_SECONDS = 5.0
# Ready reasons of problems the scheduler looks at again after a pause (the files may be fixed).
RETRIED_REASONS = ("ModelNotFound", "InvalidModelConfig", "InvalidModelFiles", "UnsupportedDtype",
                   "UnsplittableModel", "ShardNameConflict", "TensorParallelUnsupported", "ModelAccessDenied",
                   "HubUnreachable", "ResolvingModel")
Problem = tuple[str, str]  # (Ready condition reason, message)


MAX_NAME = 253  # a DNS-1123 subdomain


def shard_revision(shard: Shard) -> int:
    return placement_revision({"metadata": {"labels": shard.metadata.labels}})


def shard_name(deployment: ModelDeployment, replica: int, index: int, *, revision: int = 0) -> str:
    """``NAME-rR-sI`` in the default namespace; elsewhere ``NAME.NAMESPACE-HASH-rR-sI``, where HASH
    (of ``NAMESPACE/NAME``) keeps ``a.b`` in default and ``a`` in ``b`` apart. Too long a name is
    cut and hashed. The scheduler reports the rare clash left (ShardNameConflict) instead of
    taking another deployment's shard. A later placement revision N (make before break) puts
    ``-vN`` before ``-rR``."""
    meta = deployment.metadata
    namespace = meta.namespace or "default"
    digest = hashlib.sha256(f"{namespace}/{meta.name}".encode()).hexdigest()[:6]
    suffix = (f"-v{revision}" if revision else "") + f"-r{replica}-s{index}"
    base = meta.name if namespace == "default" else f"{meta.name}.{namespace}-{digest}"
    if len(base) + len(suffix) > MAX_NAME:
        base = base[:MAX_NAME - len(suffix) - len(digest) - 1].rstrip(".-") + f"-{digest}"
    return base + suffix


def desired_shards(deployment: ModelDeployment, plan: PlacementPlan, *, revision: int = 0,
                   hosts: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Shard objects (name → body) for every assignment of the plan, as placement ``revision``.
    A tensor-parallel stage is one Shard per rank (rank 0 keeps the stage's name, rank K adds
    ``-tK``), each with the group's ring addresses (``hosts``: node name → address)."""
    out = {}
    for assignment in plan.assignments:
        name = shard_name(deployment, assignment.replica, assignment.index, revision=revision)
        tensor = None
        if assignment.tensor_nodes:
            tensor = TensorGroup(rank=assignment.tensor_rank, size=len(assignment.tensor_nodes), peers=[
                TensorPeer(node=node, address=f"{(hosts or {}).get(node, '127.0.0.1')}:{ring_ports(name, rank=rank)[0]}")
                for rank, node in enumerate(assignment.tensor_nodes)], computeDtype=assignment.tensor_dtype or None)
            name += f"-t{assignment.tensor_rank}" if assignment.tensor_rank else ""
        labels = {"exo.dev/deployment": deployment.metadata.name,
                  "exo.dev/namespace": deployment.metadata.namespace or "default",
                  "exo.dev/node": assignment.node}
        if revision:
            labels[REVISION_LABEL] = str(revision)
        out[name] = {
            "apiVersion": "exo.dev/v1alpha1", "kind": "Shard",
            "metadata": {"name": name, "labels": labels},
            "spec": assignment.to_spec(deployment, tensor=tensor).model_dump(mode="json", exclude_none=True),
        }
    return out


LOAD_FIELDS = ("nodeName", "layers", "stages", "totalLayers", "model", "tensor")  # what a running pipeline depends on


def _moves(desired: dict[str, dict[str, Any]], ours: dict[str, Shard]) -> bool:
    """Whether the plan changes where or what a current shard serves (not just adds or drops some)."""
    for name, shard in ours.items():
        if name in desired:
            now = shard.spec.model_dump(mode="json", exclude_none=True)
            if any(not _same(now.get(f), desired[name]["spec"].get(f)) for f in LOAD_FIELDS):
                return True
    return False


def placement_serving(shards: list[Shard], *, ready_nodes: set[str]) -> bool:
    """Whether one placement revision can serve: every replica whole, every shard Ready on a Ready node."""
    if not shards:
        return False
    replicas: dict[int, list[Shard]] = {}
    for shard in shards:
        replicas.setdefault(shard.spec.replica, []).append(shard)
    return all(_whole(group) for group in replicas.values()) and all(
        s.status is not None and s.status.phase == "Ready" and s.status.observedGeneration == s.metadata.generation
        and s.spec.nodeName in ready_nodes for s in shards)


def _whole(replica: list[Shard]) -> bool:
    """One shard per stage (a tensor group counts by its rank 0; its others cannot be Ready alone)."""
    stages = [s for s in replica if s.spec.tensor is None or s.spec.tensor.rank == 0]
    return bool(stages) and len(stages) == stages[0].spec.stages


def _body(shard: Shard) -> dict[str, Any]:
    """A current shard as a desired one (kept where it is)."""
    return {"apiVersion": shard.apiVersion, "kind": "Shard",
            "metadata": {"name": shard.metadata.name, "labels": dict(shard.metadata.labels)},
            "spec": shard.spec.model_dump(mode="json", exclude_none=True)}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class _View:
    """The Nodes and Shards of the store as they are now, parsed again only after a write: a
    deployment is planned around the shards the same pass just wrote for another one, and over the
    nodes there are after an await (reading a model's headers), not those there were before it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._revision: int | None = None
        self._nodes: list[Node] = []
        self._shards: list[Shard] = []

    def now(self) -> tuple[list[Node], list[Shard]]:
        if self._revision != self.store.revision:
            self._nodes = [Node.model_validate(n) for n in self.store.list("Node")[0]]
            self._shards = [Shard.model_validate(s) for s in self.store.list("Shard")[0]]
            self._revision = self.store.revision
        return self._nodes, self._shards


class SchedulerController(Controller):
    name = "scheduler"
    watches = ("ModelDeployment", "Node", "Shard", MODEL_INFO_KIND)
    leader_only = True
    resync_seconds = 30.0

    def __init__(self, *, store: Store, clock: Callable[[], float] = time.monotonic, node_name: str = "leader",
                 local_info: LocalInfo = local_model_info,
                 hub_info: Callable[..., ModelInfoSpec] = hub_model_info,
                 hub_ready: Callable[[], bool] = hub_usable) -> None:
        self.store, self.clock, self.node_name = store, clock, node_name
        self.local_info, self.hub_info, self.hub_ready = local_info, hub_info, hub_ready
        # Per (ModelInfo name, uid, dtype, tensor ranks): the profile, or why it cannot be placed.
        self._profiles: dict[tuple[str, str | None, str | None, int], ModelProfile | Problem] = {}
        self._missing: dict[tuple[str, str | None], tuple[float, Problem]] = {}  # no ModelInfo: why, since when
        self._hub_reads: dict[str, asyncio.Task[None]] = {}  # per source: one hub read at a time
        self._reads_done: dict[tuple[str, str | None], int] = {}  # hub reads finished, per model (wakes its pass)
        # Inputs of each settled deployment, and until when they count as settled.
        self._inputs: dict[tuple[str, str | None], tuple[tuple[Any, ...], float]] = {}
        self._last_full_pass = float("-inf")

    def stop(self) -> None:
        for task in self._hub_reads.values():
            task.cancel()
        self._hub_reads.clear()
        self._profiles.clear()
        self._missing.clear()
        self._inputs.clear()

    async def profile(self, deployment: ModelDeployment) -> ModelProfile | Problem:
        """The model's profile from its ModelInfo, or (reason, message) when there is none yet or
        it cannot be split. Read off the event loop: mlx-lm's own classes tell whether the model
        can be split (and sharded over its tensor ranks)."""
        model, tensor = deployment.spec.model, deployment.spec.parallelism.tensor
        info = await self.model_info(model.source, model.revision)
        if not isinstance(info[0], ModelInfoSpec):
            return info  # type: ignore[return-value]
        spec, uid = info
        key = (model_info_name(model.source, model.revision), uid, model.dtype, tensor)
        if (cached := self._profiles.get(key)) is None:
            cached = await asyncio.to_thread(self._plan_inputs, spec, dtype=model.dtype, tensor=tensor)
            self._profiles[key] = cached
        return cached

    async def model_info(self, source: str, revision: str | None) -> tuple[ModelInfoSpec, str | None] | Problem:
        """(the ModelInfo, its uid), writing it from this node's copy when it has one; else why
        there is none yet (a hub read started in the background, or no node and no hub has it)."""
        stored = stored_model_info(self.store, source, revision)
        if stored is not None:
            self._missing.pop((source, revision), None)
            return stored[0], stored[1]["metadata"].get("uid")
        key = (source, revision)
        missing = self._missing.get(key)
        reading = self._hub_reads.get(source)
        if missing is not None and (self.clock() - missing[0] < PROFILE_RETRY_SECONDS
                                    or (reading is not None and not reading.done())):
            return missing[1]
        if reading is not None and not reading.done():
            return ("ResolvingModel", f"reading the metadata of {source} from the Hugging Face hub")
        try:
            spec = await asyncio.to_thread(self.local_info, source, revision, node_name=self.node_name, digests=False)
        except ModelMetadataError as error:
            return self._miss(key, (error.reason, str(error)))
        if spec is not None:  # the leader's own copy: its headers, at once (a publisher adds digests later)
            await create_model_info(self.store, spec)
            stored = stored_model_info(self.store, source, revision)
            return (stored[0], stored[1]["metadata"].get("uid")) if stored is not None else (spec, None)
        if not source.startswith("hf://"):
            return self._miss(key, ("ModelNotFound", f"model {source!r}: no such local directory on any node "
                                                     f"(use hf://ORG/NAME for a Hugging Face model)"))
        if not self.hub_ready():
            return self._miss(key, ("ModelNotFound", f"no node has {source} on disk and the Hugging Face hub is "
                                                     "not reachable: HF_HUB_OFFLINE is set on the leader"))
        self._hub_reads[source] = asyncio.create_task(self._read_hub(source, revision),
                                                      name=f"scheduler-hub:{model_info_name(source, revision)}")
        if missing is not None:  # a read again: the last answer stands until this one is in
            self._missing[key] = (self.clock(), missing[1])
            return missing[1]
        return ("ResolvingModel", f"reading the metadata of {source} from the Hugging Face hub")

    def _miss(self, key: tuple[str, str | None], problem: Problem) -> Problem:
        self._missing[key] = (self.clock(), problem)
        return problem

    async def _read_hub(self, source: str, revision: str | None) -> None:
        """Read the ModelInfo off the hub and record it (that write wakes the scheduler); a
        failure is kept as the deployment's problem and a pass asked for."""
        key = (source, revision)
        try:
            spec = await asyncio.to_thread(self.hub_info, source.removeprefix("hf://"), revision=revision)
            await create_model_info(self.store, spec)
            self._missing.pop(key, None)
        except ModelMetadataError as error:
            message = str(error)
            if error.reason == "HubUnreachable":
                message = f"no node has {source} on disk and the Hugging Face hub is not reachable: {error}"
            log.info("model %s: %s", source, message)
            self._missing[key] = (self.clock(), (error.reason, message))
        except StoreError as error:
            log.info("model %s: recording its ModelInfo: %s; trying again on the next pass", source, error)
            self._missing.pop(key, None)
        finally:
            self._reads_done[key] = self._reads_done.get(key, 0) + 1
            self.request_pass()

    def _plan_inputs(self, spec: ModelInfoSpec, *, dtype: str | None, tensor: int = 1) -> ModelProfile | Problem:
        try:
            profile = info_profile(spec, dtype=dtype)
            refusal = split_refusal_of(spec.config, num_layers=profile.num_layers)
            unsharded = tensor_refusal(spec.config, ranks=tensor) if not refusal else None
        except ModelMetadataError as error:
            return (error.reason, str(error))
        if unsharded:
            return ("TensorParallelUnsupported", unsharded)
        return ("UnsplittableModel", refusal) if refusal else profile

    async def reconcile(self) -> None:
        deployments, _ = self.store.list("ModelDeployment")
        node_objects, _ = self.store.list("Node")
        shard_objects, _ = self.store.list("Shard")
        now = self.clock()
        if now - self._last_full_pass >= self.resync_seconds:
            self._inputs.clear()  # the slow resync looks at everything again
            self._last_full_pass = now
        nodes_version = tuple((n["metadata"]["name"], n["metadata"]["resourceVersion"]) for n in node_objects)
        infos = {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in self.store.list(MODEL_INFO_KIND)[0]}
        shard_versions: dict[tuple[str, str | None], list[tuple[str, str]]] = {}
        for shard in shard_objects:
            owner = (shard["spec"]["deployment"], shard["spec"].get("deploymentUid"))
            shard_versions.setdefault(owner, []).append((shard["metadata"]["name"], shard["metadata"]["resourceVersion"]))
        view = _View(self.store)
        live_keys = set()
        for raw in deployments:
            meta = raw["metadata"]
            owner = (f"{meta['namespace']}/{meta['name']}", meta.get("uid"))
            live_keys.add(owner)
            # Level-triggered, but a deployment whose inputs (itself, the nodes, its shards) have
            # not changed since its last settled pass is skipped: a pass costs O(deployments).
            model = raw["spec"]["model"]
            model_key = (model["source"], model.get("revision"))
            inputs = (meta["resourceVersion"], nodes_version, tuple(shard_versions.get(owner, ())),
                      infos.get(model_info_name(*model_key)), self._reads_done.get(model_key, 0))
            seen = self._inputs.get(owner)
            if seen is not None and seen[0] == inputs and now < seen[1]:
                continue
            settled_until = await self._reconcile_one(raw, ModelDeployment.model_validate(raw), view)
            if settled_until is None:
                self._inputs.pop(owner, None)
            else:
                self._inputs[owner] = (inputs, settled_until)
        for owner in list(self._inputs):
            if owner not in live_keys:
                del self._inputs[owner]
        # What this leader remembers per model goes with the model: a record the collector deleted
        # (a new one gets a new uid), and the hub reads of models no deployment asks for.
        records = {i["metadata"]["name"] for i in self.store.list(MODEL_INFO_KIND)[0]}
        self._profiles = {key: value for key, value in self._profiles.items() if key[0] in records}
        models = set(deployed_models(self.store))
        self._reads_done = {key: count for key, count in self._reads_done.items() if key in models}
        self._hub_reads = {source: task for source, task in self._hub_reads.items() if not task.done()}
        # Garbage-collect shards whose deployment is gone (or was deleted and recreated).
        for shard in shard_objects:
            if (shard["spec"]["deployment"], shard["spec"].get("deploymentUid")) not in live_keys:
                await self._delete_shard(shard["metadata"]["name"])

    async def _reconcile_one(self, raw: dict[str, Any], deployment: ModelDeployment, view: _View) -> float | None:
        """Converge one deployment. Returns until when it is settled if nothing had to be written
        (forever, or until a missing model is looked for again), None when it wrote something."""
        profile = await self.profile(deployment)  # may take a while (a first read): the nodes are read after it
        nodes, shards = view.now()
        key, uid = deployment_key(deployment), deployment.metadata.uid
        all_ours = [s for s in shards if s.spec.deployment == key and s.spec.deploymentUid == uid]
        revision = max((shard_revision(s) for s in all_ours), default=0)
        # The newest placement is the one converged; older ones only serve until it is Ready.
        ours = {s.metadata.name: s for s in all_ours if shard_revision(s) == revision}
        older = {s.metadata.name for s in all_ours} - ours.keys()
        problem: tuple[str, str] | None = None
        unused: dict[str, str] | None = None  # Spread: nodes left without layers, and why
        ready_nodes = {n.metadata.name for n in nodes if node_is_ready(n)}
        cordoned_nodes = {n.metadata.name for n in nodes if n.spec.unschedulable}
        if not isinstance(profile, ModelProfile):
            problem, desired = profile, {}
        else:
            plan = place(deployment=deployment, nodes=nodes, shards=[s for s in shards if s.metadata.name not in older],
                         profile=profile)
            hosts = {n.metadata.name: n.spec.address for n in nodes}
            desired = desired_shards(deployment, plan, revision=revision, hosts=hosts)
            unused = plan.unused if deployment.spec.placement.strategy == "Spread" else None
            serving = placement_serving(list(ours.values()), ready_nodes=ready_nodes)
            held = sorted(cordoned_nodes & {s.spec.nodeName for s in ours.values()})
            if not plan.schedulable and held and serving:
                # Without the cordoned node it does not fit: it keeps serving there rather than stop.
                record_event(self.store, raw, reason="DrainBlocked", type_="Warning", component="scheduler",
                             message=f"shards stay on cordoned node {', '.join(held)}: {plan.reason}")
                desired = {name: _body(shard) for name, shard in ours.items()}
            elif not plan.schedulable:
                problem = ("Unschedulable", plan.reason or "cannot be placed")
            elif _moves(desired, ours) and serving:
                short = room_for_both(deployment=deployment, nodes=nodes, shards=shards, plan=plan)
                if short is None:  # make before break: a new set beside the serving one
                    revision += 1
                    log.info("placing %s again as revision %d beside the serving one", key, revision)
                    record_event(self.store, raw, reason="Replaced", component="scheduler",
                                 message=f"placed again as revision {revision} beside the serving placement")
                    ours, desired = {}, desired_shards(deployment, plan, revision=revision, hosts=hosts)
                elif held:
                    # Draining never interrupts requests: the shards stay on the cordoned node until room exists.
                    record_event(self.store, raw, reason="DrainBlocked", type_="Warning", component="scheduler",
                                 message=f"shards stay on cordoned node {', '.join(held)}: {short}")
                    desired = {name: _body(shard) for name, shard in ours.items()}
                else:
                    log.warning("placing %s again in place (break before make): %s", key, short)
                    record_event(self.store, raw, reason="Rebalanced", type_="Warning", component="scheduler",
                                 message=f"placed again in place (break before make): {short}")
        wrote, conflicts = False, []
        if problem is None or desired:
            wrote, conflicts = await self._converge(desired, ours, key=key)
            if wrote and problem is None and desired:
                record_event(self.store, raw, reason="Scheduled", message=placement_message(desired), component="scheduler")
        wrote = await self._collect_old_placements(key=key, uid=uid, ready_nodes=ready_nodes) or wrote
        if conflicts and problem is None:
            problem = ("ShardNameConflict", "; ".join(conflicts))
        shards_now = [s for s in self.store.list("Shard")[0]
                      if s["spec"]["deployment"] == key and s["spec"].get("deploymentUid") == uid]
        live = self.store.get(("ModelDeployment", deployment.metadata.namespace or "default", deployment.metadata.name))
        if live is None:
            return None
        api_urls = {n.metadata.name: f"{n.spec.apiScheme}://{n.spec.address}:{n.spec.apiPort}" for n in nodes}
        status = deployment_status(deployment=live, shards=shards_now, problem=problem, now=utcnow_iso(),
                                   api_urls=api_urls, unused_nodes=unused)
        if not _same(status, live.get("status")):
            if problem is not None and problem[0] == "Unschedulable":
                record_event(self.store, live, reason="Unschedulable", type_="Warning", message=problem[1],
                             component="scheduler")
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
        retried = problem and problem[0] in RETRIED_REASONS
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

    async def _collect_old_placements(self, *, key: str, uid: str | None, ready_nodes: set[str]) -> bool:
        """Delete older placements of a deployment once a newer one serves: all but the newest when
        it is Ready, else all but the newest and the newest that serves. Whether it deleted any."""
        by_revision: dict[int, list[Shard]] = {}
        for raw in self.store.list("Shard")[0]:
            if raw["spec"]["deployment"] == key and raw["spec"].get("deploymentUid") == uid:
                shard = Shard.model_validate(raw)
                by_revision.setdefault(shard_revision(shard), []).append(shard)
        keep = {max(by_revision, default=0)}
        serving = [r for r in sorted(by_revision, reverse=True)
                   if placement_serving(by_revision[r], ready_nodes=ready_nodes)]
        if serving and serving[0] not in keep:
            keep.add(serving[0])
        stale = [s.metadata.name for r, group in by_revision.items() if r not in keep for s in group]
        for name in stale:
            await self._delete_shard(name)
        return bool(stale)

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
