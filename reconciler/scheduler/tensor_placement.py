"""Placement of a deployment with tensor-parallel stages (``spec.parallelism.tensor`` > 1).

Each stage runs on a group of N distinct nodes. The pipeline planner (``place_stages``) lays the
layers over groups as if each were one node offering N × its smallest member's free memory (less
per-rank overhead), then every stage is expanded into N ranks, each holding 1/N of the stage's
layer weights and KV cache and of an untied float lm_head, which the ranks split by vocabulary
rows (embeddings and norms are whole on every rank), and checked against its own node. Current
groups are kept whole when all their nodes are still eligible. A group whose nodes all compute in
one dtype (Node status.compute.dtype) is planned at that width and its rank Shards carry it
(spec.tensor.computeDtype), which is what the ranks load in
(reconciler.runtime.cpu_profile.tensor_loader_in); a mixed group is planned and loaded at the
files' width. The decision is made here only, so the plan and the loaded bytes cannot disagree.
"""
from __future__ import annotations

from exo_ctl.api.meta import Condition, ObjectMeta
from exo_ctl.api.resources import ModelDeployment, Node, NodeCapacity, NodeCompute, NodeSpec, NodeStatus, Shard
from reconciler.models.memory import compute_scale
from reconciler.models.metadata import ModelProfile
from reconciler.scheduler.placement import (
    PlacementPlan, ShardAssignment, deployment_key, gib, node_is_ready, place_stages, serving_budget,
)

GROUP_JOIN = "+"  # a group's name in reasons: its nodes in rank order


def place_tensor_groups(*, deployment: ModelDeployment, nodes: list[Node], shards: list[Shard],
                        profile: ModelProfile) -> PlacementPlan:
    ranks = deployment.spec.parallelism.tensor
    spec = deployment.spec
    key, uid = deployment_key(deployment), deployment.metadata.uid
    ours = [s for s in shards if s.spec.deployment == key and (uid is None or s.spec.deploymentUid in (None, uid))]
    others = [s for s in shards if s not in ours]
    if spec.replicas == 0:
        return PlacementPlan()
    selector = spec.placement.nodeSelector
    eligible = sorted((n for n in nodes if node_is_ready(n)
                       and all(n.metadata.labels.get(k) == v for k, v in selector.items())),
                      key=lambda n: n.metadata.name)
    if len(eligible) < ranks:
        return PlacementPlan(reason=f"spec.parallelism.tensor is {ranks}: each stage needs {ranks} distinct Ready "
                                    f"nodes, but {len(eligible)} match")
    headroom = spec.resources.headroom_bytes
    used: dict[str, int] = {}
    for shard in others:
        used[shard.spec.nodeName] = used.get(shard.spec.nodeName, 0) + shard.spec.reserved_bytes
    free = {n.metadata.name: max(0, (n.status.allocatable.memory if n.status else 0) - headroom
                                 - used.get(n.metadata.name, 0)) for n in eligible}
    groups = _groups(ours, free=free, ranks=ranks)
    overhead = serving_budget(deployment, profile).overhead_bytes(profile, last=True)
    node_dtype = {n.metadata.name: n.status.compute.dtype if n.status else "" for n in eligible}
    group_dtype = {GROUP_JOIN.join(group): _common({node_dtype[n] for n in group}) for group in groups}
    virtual = [_virtual_node(group, free=free, ranks=ranks, overhead=overhead, headroom=headroom, selector=selector,
                             dtype=group_dtype[GROUP_JOIN.join(group)]) for group in groups]
    members = {GROUP_JOIN.join(group): group for group in groups}
    current = [s.model_copy(update={"spec": s.spec.model_copy(update={"nodeName": GROUP_JOIN.join(g), "tensor": None})})
               for s in ours if s.spec.tensor is not None and s.spec.tensor.rank == 0
               and (g := [p.node for p in s.spec.tensor.peers]) in groups]
    plan = place_stages(deployment=deployment, nodes=virtual, shards=current, profile=profile)
    assignments: list[ShardAssignment] = []
    for a in plan.assignments:
        group = members[a.node]
        scale = compute_scale(profile.dtype, node_dtype=group_dtype[a.node], requested=spec.model.dtype)
        layers = int(sum(profile.layer_bytes[a.start:a.end]) * scale)  # as a.memory_bytes counts them
        if a.end == profile.num_layers and _head_splits(profile, ranks=ranks):
            layers += int(profile.lm_head_bytes * scale)
        weights = (a.memory_bytes - layers) + -(-layers // ranks)
        for rank, node in enumerate(group):
            rank_shard = a.model_copy(update={"node": node, "memory_bytes": weights, "tensor_rank": rank,
                                              "kv_cache_bytes": -(-a.kv_cache_bytes // ranks), "tensor_nodes": group,
                                              "tensor_dtype": group_dtype[a.node]})
            need = weights + rank_shard.kv_cache_bytes + a.overhead_bytes
            if need > free[node]:
                return PlacementPlan(assignments=assignments, reason=(
                    f"tensor rank {rank} of stage {a.index + 1}/{a.stages} needs {gib(need)} on node {node}, "
                    f"which offers {gib(free[node])}"))
            free[node] -= need
            assignments.append(rank_shard)
    unused = {node: reason for name, reason in plan.unused.items() for node in members.get(name, [])}
    grouped = {n for group in groups for n in group}
    unused.update({n: f"left over: tensor groups take {ranks} nodes each" for n in free
                   if n not in grouped} if spec.placement.strategy == "Spread" else {})
    return PlacementPlan(assignments=assignments, reason=plan.reason, unused=unused)


def _groups(ours: list[Shard], *, free: dict[str, int], ranks: int) -> list[list[str]]:
    """Current groups still whole on eligible nodes first, then the other nodes by free memory."""
    groups: list[list[str]] = []
    taken: set[str] = set()
    for shard in sorted(ours, key=lambda s: (s.spec.replica, s.spec.index)):
        group = [p.node for p in shard.spec.tensor.peers] if shard.spec.tensor is not None else []
        if len(group) == ranks and all(n in free for n in group) and not taken & set(group):
            groups.append(group)
            taken.update(group)
    rest = sorted((n for n in free if n not in taken), key=lambda n: (-free[n], n))
    groups += [rest[i:i + ranks] for i in range(0, len(rest) - ranks + 1, ranks)]
    return groups


def _head_splits(profile: ModelProfile, *, ranks: int) -> bool:
    """Whether the ranks split the head by vocabulary rows, as the rank loader does
    (reconciler.runtime.tensor_worker._shard_head): an untied float lm_head whose rows the group
    divides. A tied embedding stays whole (the lookup needs every row), and so does a quantized head."""
    return (profile.lm_head_bytes > 0 and profile.quantization_bits is None
            and profile.vocab_size % ranks == 0)


def _common(dtypes: set[str]) -> str:
    """The compute dtype every node of a group reports, or "" where they differ."""
    return next(iter(dtypes)) if len(dtypes) == 1 else ""


def _virtual_node(group: list[str], *, free: dict[str, int], ranks: int, overhead: int, headroom: int,
                  selector: dict[str, str], dtype: str) -> Node:
    """A stand-in Node for the pipeline planner: what the group can hold of one stage, computing
    in ``dtype`` (its nodes' common one)."""
    offer = ranks * max(0, min(free[n] for n in group) - overhead) + overhead
    capacity = NodeCapacity(memory=offer + headroom)
    # Built without validation: "a+b" is no valid node name, which keeps it apart from real ones.
    return Node(metadata=ObjectMeta.model_construct(name=GROUP_JOIN.join(group), labels=dict(selector)),
                spec=NodeSpec(nodeId=GROUP_JOIN.join(group), address="", apiPort=0, raftPort=0),
                status=NodeStatus(capacity=capacity, allocatable=capacity, compute=NodeCompute(dtype=dtype),
                                  conditions=[Condition(type="Ready", status="True")]))
