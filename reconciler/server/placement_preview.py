"""The placement a ModelDeployment would get now, for server dry runs (``exoctl apply --dry-run=server``).

The answer of a dry-run create/replace/apply of a ModelDeployment carries the plan in the
``X-Exo-Placement`` header as compact JSON: the same ``place`` the scheduler runs, over the live
Nodes and Shards of this node's replica, so the user sees where the layers would go (or why they
cannot go anywhere) before anything is written.

The model's sizes come from what the scheduler would use: its ModelInfo in the replicated state,
else this node's copy, else the Hugging Face hub; only when none of them answers (offline, hub
unreachable) from the catalog of known configurations, so a 70B model can be planned anywhere.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import ValidationError

from exo_ctl.api.resources import ModelDeployment, ModelSource, Node, Shard
from reconciler.controllers.model_info import local_model_info, stored_model_info
from reconciler.models.catalog import ModelNotFound, info_profile, resolve_profile, split_refusal_of
from reconciler.models.hub import hub_model_info, hub_usable
from reconciler.models.metadata import ModelMetadataError, ModelProfile
from reconciler.models.model_info import ModelInfoSpec
from reconciler.runtime.tensor_group import tensor_refusal, tensor_refusal_of
from reconciler.scheduler.placement import deployment_key, place
from reconciler.store.base import Store

PLACEMENT_HEADER = "X-Exo-Placement"


def placement_preview(store: Store, obj: dict[str, Any]) -> dict[str, Any]:
    """``{"assignments": [{replica, index, stages, node, layers: {start, end}, memoryBytes, kvCacheBytes,
    overheadBytes}], "problem", "reason"}`` for the (not yet written) deployment ``obj``. ``problem``
    is null when every replica fits, else the Ready condition's reason the scheduler would set
    (Unschedulable, ModelNotFound, InvalidModelConfig, UnsupportedDtype, UnsplittableModel,
    TensorParallelUnsupported ...) and ``reason`` says why. A tensor-parallel rank also carries
    ``tensor: {rank, nodes}``.
    Blocking (reads the model's file headers): call it off the event loop."""
    deployment = ModelDeployment.model_validate(obj)
    model, ranks = deployment.spec.model, deployment.spec.parallelism.tensor
    try:
        info = model_info_for_preview(store, model)
        if info is not None:
            profile = info_profile(info, dtype=model.dtype)
            refusal = split_refusal_of(info.config, num_layers=profile.num_layers)
            unsharded = tensor_refusal(info.config, ranks=ranks)
        else:
            profile, refusal = catalog_fallback(model), None
            unsharded = tensor_refusal_of(model.source, revision=model.revision, ranks=ranks)
    except ModelMetadataError as error:
        return {"assignments": [], "problem": error.reason, "reason": str(error)}
    if refusal:
        return {"assignments": [], "problem": "UnsplittableModel", "reason": refusal}
    if unsharded:  # the scheduler's condition for it (a real write is refused at apply time)
        return {"assignments": [], "problem": "TensorParallelUnsupported", "reason": unsharded}
    nodes = [Node.model_validate(n) for n in store.list("Node")[0]]
    key = deployment_key(deployment)
    # The object being previewed replaces whatever it was: its own current shards count as "current".
    shards = [Shard.model_validate(s) for s in store.list("Shard")[0]]
    shards = [s for s in shards if s.spec.deployment != key or s.spec.deploymentUid in (None, deployment.metadata.uid)]
    plan = place(deployment=deployment, nodes=nodes, shards=shards, profile=profile)
    return {
        "assignments": [
            {"replica": a.replica, "index": a.index, "stages": a.stages, "node": a.node,
             "layers": {"start": a.start, "end": a.end}, "memoryBytes": a.memory_bytes,
             "kvCacheBytes": a.kv_cache_bytes, "overheadBytes": a.overhead_bytes,
             **({"tensor": {"rank": a.tensor_rank, "nodes": list(a.tensor_nodes)}} if a.tensor_nodes else {})}
            for a in plan.assignments
        ],
        "problem": None if plan.schedulable else "Unschedulable",
        "reason": plan.reason,
    }


def model_info_for_preview(store: Store, model: ModelSource) -> ModelInfoSpec | None:
    """What the scheduler would plan from: the recorded ModelInfo, else this node's copy, else the
    hub's (hub errors other than "unreachable" are the answer); None when none of them can tell."""
    stored = stored_model_info(store, model.source, model.revision)
    if stored is not None:
        return stored[0]
    local = local_model_info(model.source, model.revision, node_name="dry-run", digests=False)
    if local is not None or not model.source.startswith("hf://") or not hub_usable():
        return local
    try:
        return hub_model_info(model.source.removeprefix("hf://"), revision=model.revision)
    except ModelMetadataError as error:
        if error.reason != "HubUnreachable":
            raise
        return None


def catalog_fallback(model: ModelSource) -> ModelProfile:
    """The offline estimate from the catalog of known configurations (or why there is none)."""
    try:
        return resolve_profile(model.source, dtype=model.dtype, revision=model.revision)
    except ModelNotFound as error:
        if model.source.startswith("hf://") and hub_usable():
            raise ModelNotFound(f"{error} (and the Hugging Face hub is not reachable)") from None
        raise


async def placement_header(store: Store, obj: dict[str, Any]) -> dict[str, str]:
    """The response header for a dry-run write of ``obj`` (empty for kinds other than ModelDeployment)."""
    if obj.get("kind") != "ModelDeployment":
        return {}
    try:
        preview = await asyncio.to_thread(placement_preview, store, obj)
    except ValidationError as error:  # the write path validated it already; never fail the dry run over this
        preview = {"assignments": [], "problem": "Invalid", "reason": f"cannot plan: {error.errors()[0]['msg']}"}
    return {PLACEMENT_HEADER: json.dumps(preview, separators=(",", ":"), ensure_ascii=True)}
