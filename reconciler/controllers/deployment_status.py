"""A ModelDeployment's status from its Shards: readyReplicas, a shard summary and conditions.

Conditions follow Kubernetes conventions and kstatus (what Flux and Argo CD read): ``Ready``,
``Progressing`` and ``Degraded``, plus the abnormal-true pair ``Reconciling`` / ``Stalled``, each
stamped with the generation it describes.
"""
from __future__ import annotations

from typing import Any


REVISION_LABEL = "exo.dev/placement-revision"  # a later placement, made before the older one is removed
WAITING_REASONS = ("ResolvingModel",)  # problems that resolve by themselves: progressing, not stalled


def placement_revision(shard: dict[str, Any]) -> int:
    """The placement revision a Shard belongs to (0 without the label)."""
    value = str(((shard.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL, "0"))
    return int(value) if value.isdigit() else 0


def shard_ready(shard: dict[str, Any]) -> bool:
    status = shard.get("status") or {}
    return status.get("phase") == "Ready" and status.get("observedGeneration") == shard["metadata"].get("generation")


def _condition(kind: str, value: bool, reason: str, message: str, *, generation: int,
               previous: dict[str, dict[str, Any]], now: str) -> dict[str, Any]:
    status = "True" if value else "False"
    old = previous.get(kind)
    moved = old is None or old.get("status") != status
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now if moved else old.get("lastTransitionTime", now),
            "observedGeneration": generation}


def deployment_status(*, deployment: dict[str, Any], shards: list[dict[str, Any]],
                      problem: tuple[str, str] | None, now: str,
                      api_urls: dict[str, str] | None = None,
                      unused_nodes: dict[str, str] | None = None) -> dict[str, Any]:
    """Pure: the status the deployment should have, given its shards and the scheduler's verdict
    (``problem`` = (reason, message) when it could not be placed, e.g. Unschedulable or ModelNotFound).
    ``unused_nodes`` (Spread only: node → why it got no layers) adds the AllNodesUsed condition."""
    generation = deployment["metadata"].get("generation", 1)
    desired = deployment["spec"].get("replicas", 1)
    previous = {c["type"]: c for c in (deployment.get("status") or {}).get("conditions", [])}
    by_replica: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for shard in shards:
        by_replica.setdefault((shard["spec"]["replica"], placement_revision(shard)), []).append(shard)

    ready_replicas, endpoint, counted = 0, None, set()
    for replica, revision in sorted(by_replica, key=lambda k: (k[0], -k[1])):  # newest placement first
        replica_shards = by_replica[(replica, revision)]
        stages = replica_shards[0]["spec"]["stages"]
        whole = len({s["spec"]["index"] for s in replica_shards}) == stages  # a tensor stage has a shard per rank
        if replica not in counted and whole and all(shard_ready(s) for s in replica_shards):
            ready_replicas += 1
            counted.add(replica)
            if endpoint is None:  # any node serves the model; the first stage's node is the natural entry
                first = min(replica_shards, key=lambda s: s["spec"]["index"])["spec"]["nodeName"]
                endpoint = (api_urls or {}).get(first)
    failed = [s for s in shards if (s.get("status") or {}).get("phase") == "Failed"]
    loading = [s for s in shards if not shard_ready(s)]

    if problem:
        ready_reason, message = problem
    elif failed:
        first = failed[0]
        ready_reason = "ShardFailed"
        message = f"shard {first['metadata']['name']} on {first['spec']['nodeName']}: {(first.get('status') or {}).get('message', 'failed')}"
    elif ready_replicas < desired:
        done = len(shards) - len(loading)
        ready_reason, message = "ShardsLoading", f"{done}/{len(shards)} shards ready, {ready_replicas}/{desired} replicas"
    else:
        ready_reason, message = "AllShardsReady", f"{ready_replicas}/{desired} replicas ready"

    ready = ready_replicas >= desired and not problem
    stalled = bool((problem and problem[0] not in WAITING_REASONS) or failed)
    progressing = not ready and not stalled
    degraded = stalled or (0 < ready_replicas < desired)
    args = {"generation": generation, "previous": previous, "now": now}
    conditions = [
        _condition("Ready", ready, ready_reason, message, **args),
        _condition("Progressing", progressing, "Reconciling" if progressing else ready_reason, "" if not progressing else message, **args),
        _condition("Degraded", degraded, ready_reason if degraded else "AsExpected", message if degraded else "", **args),
        _condition("Reconciling", progressing, ready_reason if progressing else "Done", message if progressing else "", **args),
        _condition("Stalled", stalled, ready_reason if stalled else "Running", message if stalled else "", **args),
    ]
    if unused_nodes is not None:
        left_out = "; ".join(f"node {node} got no layers: {why}" for node, why in sorted(unused_nodes.items()))
        conditions.append(_condition("AllNodesUsed", not unused_nodes, "NodesWithoutLayers" if unused_nodes else "Spread",
                                     left_out, **args))
    summary = [
        {"replica": s["spec"]["replica"], "index": s["spec"]["index"], "node": s["spec"]["nodeName"],
         "layers": f"{s['spec']['layers']['start']}-{s['spec']['layers']['end'] - 1}",
         "phase": (s.get("status") or {}).get("phase", "Pending")}
        for s in sorted(shards, key=lambda s: (s["spec"]["replica"], s["spec"]["index"]))
    ]
    status: dict[str, Any] = {"observedGeneration": generation, "readyReplicas": ready_replicas,
                              "shards": summary, "conditions": conditions}
    if endpoint:
        status["endpoint"] = f"{endpoint}/v1"
    return status
