"""Where each layer of a ModelDeployment runs: a pure function of the cluster's state.

``place`` splits a model's layers into contiguous pipeline stages over Ready nodes, in proportion
to each node's usable memory, never over it, and keeps the current assignment when it is still
valid (or moves as few layers as it can when it is not).
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from pydantic import Field

from exo_ctl.api.meta import Frozen
from exo_ctl.api.resources import DEFAULT_NAMESPACE, LayerRange, ModelDeployment, Node, Shard, ShardSpec, TensorGroup
from reconciler.datapath.pipeline import PREFILL_CHUNK
from reconciler.models.memory import ServingBudget, compute_scale, reserved_context_length
from reconciler.models.metadata import ModelProfile

GIB = 1024**3
# Above this many nodes in one replica, new nodes are appended instead of searched into the order.
_INSERTION_SEARCH_LIMIT = 16
_NODES_SHOWN = 8  # nodes named, with what they offer, in a reason


class ShardAssignment(Frozen):
    """One pipeline stage of one replica: layers [start, end) on one node."""

    replica: int = Field(ge=0)
    index: int = Field(ge=0)
    stages: int = Field(ge=1)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    total_layers: int = Field(ge=1)
    node: str
    memory_bytes: int = Field(ge=0)  # weights
    kv_cache_bytes: int = Field(default=0, ge=0)
    overhead_bytes: int = Field(default=0, ge=0)  # activations + runtime baseline
    tensor_rank: int = Field(default=0, ge=0)
    tensor_nodes: list[str] = Field(default_factory=list, description="the stage's tensor group, in rank order")
    tensor_dtype: str = Field(default="", description="the dtype the group's ranks load in; \"\": the files'")

    @property
    def layers(self) -> LayerRange:
        return LayerRange(start=self.start, end=self.end)

    def to_spec(self, deployment: ModelDeployment, *, tensor: TensorGroup | None = None) -> ShardSpec:
        """The ShardSpec the scheduler writes for this stage (``tensor``: this rank's group)."""
        return ShardSpec(
            deployment=deployment_key(deployment),
            deploymentUid=deployment.metadata.uid,
            generation=deployment.metadata.generation,
            replica=self.replica,
            index=self.index,
            stages=self.stages,
            layers=self.layers,
            totalLayers=self.total_layers,
            nodeName=self.node,
            model=deployment.spec.model,
            memoryBytes=self.memory_bytes,
            kvCacheBytes=self.kv_cache_bytes,
            overheadBytes=self.overhead_bytes,
            maxRequests=deployment.spec.resources.maxConcurrentRequests,
            maxBatchSize=deployment.spec.resources.maxBatchSize,
            tensor=tensor,
        )


class PlacementPlan(Frozen):
    """Shard assignments for every replica that fits; ``reason`` says why the rest do not."""

    assignments: list[ShardAssignment] = Field(default_factory=list)
    reason: str | None = None
    unused: dict[str, str] = Field(default_factory=dict, description="Spread: eligible node → why it got no layers")

    @property
    def schedulable(self) -> bool:
        return self.reason is None

    def replica(self, replica: int) -> list[ShardAssignment]:
        return [a for a in self.assignments if a.replica == replica]


def deployment_key(deployment: ModelDeployment) -> str:
    """``NAMESPACE/NAME``, as in ShardSpec.deployment."""
    return f"{deployment.metadata.namespace or DEFAULT_NAMESPACE}/{deployment.metadata.name}"


def gib(value: int | float) -> str:
    return f"{value / GIB:.1f} GiB"


def node_is_ready(node: Node) -> bool:
    conditions = node.status.conditions if node.status else []
    return any(c.type == "Ready" and c.status == "True" for c in conditions) and not node.metadata.deletionTimestamp


def node_is_schedulable(node: Node) -> bool:
    """Ready and not cordoned (``spec.unschedulable``): a node new shards may go to."""
    return node_is_ready(node) and not node.spec.unschedulable


def serving_budget(deployment: ModelDeployment, profile: ModelProfile) -> ServingBudget:
    """The context length and concurrency a deployment's stages reserve KV cache for."""
    resources = deployment.spec.resources
    context = reserved_context_length(resources.contextLength, profile.context_length)
    return ServingBudget(context_length=context, max_concurrent_requests=resources.maxConcurrentRequests,
                         prefill_chunk=PREFILL_CHUNK)


def place(*, deployment: ModelDeployment, nodes: list[Node], shards: list[Shard], profile: ModelProfile) -> PlacementPlan:
    """Plan every replica of ``deployment``; ``shards`` are all Shards in the cluster. Cordoned
    nodes get no shards: a layout that uses one is planned again without it."""
    cordoned = sorted(n.metadata.name for n in nodes if n.spec.unschedulable)
    schedulable = [n for n in nodes if not n.spec.unschedulable]
    if deployment.spec.parallelism.tensor > 1:
        from reconciler.scheduler.tensor_placement import place_tensor_groups

        plan = place_tensor_groups(deployment=deployment, nodes=schedulable, shards=shards, profile=profile)
    else:
        plan = place_stages(deployment=deployment, nodes=schedulable, shards=shards, profile=profile)
    if plan.reason and cordoned:
        plan = plan.model_copy(update={"reason": f"{plan.reason} ({_count(len(cordoned), 'cordoned node')} "
                                                 f"left out: {', '.join(cordoned[:_NODES_SHOWN])})"})
    return plan


def place_stages(*, deployment: ModelDeployment, nodes: list[Node], shards: list[Shard],
                 profile: ModelProfile) -> PlacementPlan:
    """``place`` with one node per stage (pipeline only)."""
    spec = deployment.spec
    key = deployment_key(deployment)
    uid = deployment.metadata.uid
    ours: list[Shard] = []
    others: list[Shard] = []
    for shard in shards:
        mine = shard.spec.deployment == key and (uid is None or shard.spec.deploymentUid in (None, uid))
        (ours if mine else others).append(shard)
    if spec.replicas == 0:
        return PlacementPlan()

    selector = spec.placement.nodeSelector
    ready = [n for n in nodes if node_is_ready(n)]
    eligible = sorted((n for n in ready if all(n.metadata.labels.get(k) == v for k, v in selector.items())),
                      key=lambda n: n.metadata.name)
    if not eligible:
        return PlacementPlan(reason=_no_nodes_reason(nodes=nodes, ready=ready, selector=selector))

    headroom = spec.resources.headroom_bytes
    used_by_others: dict[str, int] = {}
    for shard in others:
        used_by_others[shard.spec.nodeName] = used_by_others.get(shard.spec.nodeName, 0) + shard.spec.reserved_bytes
    # A node serving float files in its own compute dtype holds `scale` bytes per planned byte.
    scale = {n.metadata.name: compute_scale(profile.dtype, node_dtype=n.status.compute.dtype if n.status else "",
                                            requested=spec.model.dtype) for n in eligible}
    free = {
        n.metadata.name: int(max(0, (n.status.allocatable.memory if n.status else 0) - headroom
                                 - used_by_others.get(n.metadata.name, 0)) / scale[n.metadata.name])
        for n in eligible
    }
    current: dict[int, dict[int, Shard]] = {}
    for shard in ours:
        current.setdefault(shard.spec.replica, {})[shard.spec.index] = shard

    assignments: list[ShardAssignment] = []
    taken: set[str] = set()
    budget = serving_budget(deployment, profile)
    offered = dict(free)
    for replica in range(spec.replicas):
        planner = _ReplicaPlanner(deployment=deployment, profile=profile, budget=budget, free=free, taken=taken,
                                  previous=_previous_layout(current.get(replica, {}), profile.num_layers),
                                  replicas_left=spec.replicas - replica)
        stages = planner.plan()
        if isinstance(stages, str):
            prefix = f"replica {replica}: " if spec.replicas > 1 else ""
            return PlacementPlan(assignments=assignments, reason=prefix + stages)
        for index, (node, start, end) in enumerate(stages):
            last = index == len(stages) - 1
            size = profile.stage_bytes(start, end, first=index == 0, last=last)
            kv, overhead = budget.kv_cache_bytes(profile, start, end), budget.overhead_bytes(profile, last=last)
            free[node] -= size + kv + overhead
            taken.add(node)
            assignments.append(ShardAssignment(replica=replica, index=index, stages=len(stages), start=start, end=end,
                                               total_layers=profile.num_layers, node=node,
                                               memory_bytes=int(size * scale[node]),
                                               kv_cache_bytes=int(kv * scale[node]),
                                               overhead_bytes=int(overhead * scale[node])))
    unused = _unused_nodes(deployment=deployment, profile=profile, budget=budget, offered=offered,
                           assignments=assignments) if spec.placement.strategy == "Spread" else {}
    return PlacementPlan(assignments=assignments, unused=unused)


def _unused_nodes(*, deployment: ModelDeployment, profile: ModelProfile, budget: ServingBudget,
                  offered: dict[str, int], assignments: list[ShardAssignment]) -> dict[str, str]:
    """Why each eligible node of a Spread deployment holds none of its layers."""
    used = {a.node for a in assignments}
    smallest = min(size + budget.kv_cache_bytes(profile, i, i + 1) for i, size in enumerate(profile.layer_bytes))
    smallest += budget.overhead_bytes(profile, last=False)
    max_nodes = deployment.spec.placement.maxNodes
    stages = max((a.stages for a in assignments), default=0)
    out = {}
    for node in sorted(offered.keys() - used):
        if offered[node] < smallest:
            out[node] = f"{gib(offered[node])} free, less than one layer needs with its KV cache ({gib(smallest)})"
        elif stages >= profile.num_layers:
            out[node] = (f"the model has {_count(profile.num_layers, 'layer')} and a stage holds at least one: "
                         f"{_count(stages, 'node')} per replica at most")
        elif max_nodes is not None and stages >= max_nodes:
            out[node] = f"maxNodes is {max_nodes}"
        else:
            out[node] = f"each of the {deployment.spec.replicas} replicas is spread over its own {_count(stages, 'node')}"
    return out


def _count(number: int, word: str) -> str:
    return f"{number} {word}{'' if number == 1 else 's'}"


def room_for_both(*, deployment: ModelDeployment, nodes: list[Node], shards: list[Shard],
                  plan: PlacementPlan) -> str | None:
    """Make-before-break check: None when every node of ``plan`` can hold, at once, every shard
    it has now (``shards``: all deployments, the old placement included) and the plan's new
    shards on it; otherwise why not, naming the first node short of memory."""
    headroom = deployment.spec.resources.headroom_bytes
    allocatable = {n.metadata.name: n.status.allocatable.memory if n.status else 0 for n in nodes}
    used: dict[str, int] = {}
    for shard in shards:
        used[shard.spec.nodeName] = used.get(shard.spec.nodeName, 0) + shard.spec.reserved_bytes
    new: dict[str, int] = {}
    for a in plan.assignments:
        new[a.node] = new.get(a.node, 0) + a.memory_bytes + a.kv_cache_bytes + a.overhead_bytes
    for node in sorted(new):
        room = allocatable.get(node, 0) - headroom - used.get(node, 0)
        if new[node] > room:
            return (f"node {node} cannot hold the new placement ({gib(new[node])}) beside what it holds now "
                    f"({gib(used.get(node, 0))} of {gib(allocatable.get(node, 0))}, headroom {gib(headroom)})")
    return None


Stage = tuple[str, int, int]  # node, start, end


def _previous_layout(by_index: dict[int, Shard], num_layers: int) -> list[Stage]:
    """The replica's current stages in order, or [] when they do not form one whole pipeline."""
    stages = len(by_index)
    if not stages or sorted(by_index) != list(range(stages)):
        return []
    layout: list[Stage] = []
    expected_start = 0
    for index in range(stages):
        spec = by_index[index].spec
        if spec.stages != stages or spec.totalLayers != num_layers or spec.layers.start != expected_start:
            return []
        layout.append((spec.nodeName, spec.layers.start, spec.layers.end))
        expected_start = spec.layers.end
    if expected_start != num_layers or len({node for node, _, _ in layout}) != stages:
        return []
    return layout


class _ReplicaPlanner:
    """Chooses nodes and layer ranges for one replica."""

    def __init__(self, *, deployment: ModelDeployment, profile: ModelProfile, budget: ServingBudget,
                 free: dict[str, int], taken: set[str], previous: list[Stage], replicas_left: int):
        placement = deployment.spec.placement
        self.profile, self.budget, self.free, self.previous = profile, budget, free, previous
        self.strategy = placement.strategy
        self.min_nodes = placement.minNodes
        self.max_nodes = min(placement.maxNodes or profile.num_layers, profile.num_layers)
        self.replicas_left = replicas_left
        self.taken = taken
        # Per layer: its weights and its KV cache.
        self.layer_cost = [size + budget.kv_cache_bytes(profile, i, i + 1) for i, size in enumerate(profile.layer_bytes)]
        self.prefix = [0]
        for size in self.layer_cost:
            self.prefix.append(self.prefix[-1] + size)
        self.previous_ranges = {node: (start, end) for node, start, end in previous}
        smallest_stage = min(self.layer_cost) + budget.overhead_bytes(profile, last=False)
        # A node that cannot hold even one layer is no candidate.
        self.usable = sorted((n for n, size in free.items() if size >= smallest_stage),
                             key=lambda n: (-free[n], n))

    def plan(self) -> list[Stage] | str:
        if not self.usable:
            return self._does_not_fit(sorted(self.free, key=lambda n: (-self.free[n], n)))
        disjoint = [n for n in self.usable if n not in self.taken]
        if (self.taken or self.replicas_left > 1) and len(disjoint) >= self.min_nodes:
            stages = self._plan_from(disjoint, share=True)
            if not isinstance(stages, str):
                return stages
        return self._plan_from(self.usable, share=False)

    # --- node choice ---------------------------------------------------------------------------

    def _plan_from(self, pool: list[str], *, share: bool) -> list[Stage] | str:
        if len(pool) < self.min_nodes:
            return self._too_few_nodes(pool)
        survivors = [n for n in pool if n in self.previous_ranges]
        if self.strategy == "Spread":
            count = len(pool) // self.replicas_left if share else len(pool)
            count = max(self.min_nodes, min(count, self.max_nodes))
            chosen = (survivors + [n for n in pool if n not in survivors])[:count]
            kept = self._keep_previous(set(chosen))
            if kept is not None:
                return kept
            stages = self._split(chosen)
            return stages if stages is not None else self._does_not_fit(chosen)
        kept = self._keep_previous(set(survivors)) if len(survivors) == len(self.previous) else None
        if kept is not None:
            return kept
        for count in range(self.min_nodes, min(self.max_nodes, len(pool)) + 1):
            preferred = (survivors + [n for n in pool if n not in survivors])[:count]
            largest = pool[:count]
            for candidate in (preferred, largest) if preferred != largest else (preferred,):
                stages = self._split(candidate)
                if stages is not None:
                    return stages
        return self._does_not_fit(pool[: min(self.max_nodes, len(pool))])

    def _keep_previous(self, chosen: set[str]) -> list[Stage] | None:
        """The current layout, when it is still on exactly ``chosen`` and fits."""
        if not self.previous or {n for n, _, _ in self.previous} != chosen:
            return None
        if not self.min_nodes <= len(self.previous) <= self.max_nodes:
            return None
        last = len(self.previous) - 1
        for index, (node, start, end) in enumerate(self.previous):
            if self._stage_bytes(start, end, first=index == 0, last=index == last) > self.free[node]:
                return None
        return list(self.previous)

    # --- stage order and layer split ------------------------------------------------------------

    def _split(self, chosen: list[str]) -> list[Stage] | None:
        """Best feasible layout over ``chosen``: survivors keep their order, new nodes are inserted
        where they move the fewest layers."""
        survivors = sorted((n for n in chosen if n in self.previous_ranges), key=lambda n: self.previous_ranges[n])
        newcomers = sorted((n for n in chosen if n not in self.previous_ranges), key=lambda n: (-self.free[n], n))
        if not survivors or len(chosen) > _INSERTION_SEARCH_LIMIT:
            return self._best_split(survivors + newcomers)[1]
        order = survivors
        for position, node in enumerate(newcomers):
            pending = newcomers[position + 1:]
            best: tuple[int, int] | None = None
            for slot in range(len(order) + 1):
                cost, stages = self._best_split(order[:slot] + [node] + order[slot:] + pending)
                if stages is not None and (best is None or cost < best[0]):
                    best = (cost, slot)
            if best is None:
                return None
            order = order[:best[1]] + [node] + order[best[1]:]
        return self._best_split(order)[1]

    def _best_split(self, order: list[str]) -> tuple[int, list[Stage] | None]:
        """Boundaries over ``order`` that fit every node, minimising (layers that current nodes must
        newly load, distance from the proportional split), by dynamic programming over stage ends.
        The cost is one integer: moved layers weigh more than any possible distance."""
        layers, count = self.profile.num_layers, len(order)
        if count > layers:
            return 0, None
        targets = _proportional_boundaries([self.free[n] for n in order], layers)
        weight = (layers + 1) * (count + 1)
        # cost[i][b]: best cost with the first i stages covering [0, b); back[i][b]: where stage i-1 starts.
        cost: list[list[int | None]] = [[0] + [None] * layers]
        back: list[list[int]] = [[-1] * (layers + 1)]
        for i, node in enumerate(order):
            first, last = i == 0, i == count - 1
            extra = self._stage_bytes(0, 0, first=first, last=last)
            old = self.previous_ranges.get(node)
            row: list[int | None] = [None] * (layers + 1)
            links = [-1] * (layers + 1)
            previous = cost[i]
            for end in range(i + 1, layers - (count - i - 1) + 1) if not last else (layers,):
                # Starts whose stage fits: prefix[start] >= prefix[end] + extra - free.
                lowest = max(i, bisect_left(self.prefix, self.prefix[end] + extra - self.free[node]))
                best_cost, best_start = None, -1
                for start in range(lowest, end):
                    before = previous[start]
                    if before is None:
                        continue
                    # Only layers a node that already serves this replica must load count as moved:
                    # a newcomer loads its share either way.
                    loaded = 0 if old is None else (end - start) - max(0, min(end, old[1]) - max(start, old[0]))
                    total = before + loaded * weight + abs(end - targets[i])
                    if best_cost is None or total < best_cost:
                        best_cost, best_start = total, start
                row[end], links[end] = best_cost, best_start
            cost.append(row)
            back.append(links)
        if cost[count][layers] is None:
            return 0, None
        stages: list[Stage] = []
        end = layers
        for i in range(count, 0, -1):
            start = back[i][end]
            stages.append((order[i - 1], start, end))
            end = start
        return cost[count][layers], stages[::-1]

    def _stage_bytes(self, start: int, end: int, *, first: bool, last: bool) -> int:
        size = self.prefix[end] - self.prefix[start] + self.budget.overhead_bytes(self.profile, last=last)
        if first:
            size += self.profile.embedding_bytes
        if last:
            size += self.profile.head_bytes
            if self.profile.tie_word_embeddings and not first:
                size += self.profile.embedding_bytes
        return size

    # --- reasons ---------------------------------------------------------------------------------

    def _too_few_nodes(self, pool: list[str]) -> str:
        return f"minNodes is {self.min_nodes}, but only {_nodes(len(pool))} with room for a layer"

    def _does_not_fit(self, chosen: list[str]) -> str:
        """Weights, KV cache and overhead needed, against what each node offers."""
        offer = sum(self.free[n] for n in chosen)
        limit = " (maxNodes)" if len(chosen) < len(self.usable) and len(chosen) == self.max_nodes else ""
        stages = max(1, min(len(chosen), self.profile.num_layers))
        budget, profile = self.budget, self.profile
        kv = budget.kv_cache_bytes(profile, 0, profile.num_layers)
        overhead = budget.overhead_bytes(profile, last=True) + (stages - 1) * budget.overhead_bytes(profile, last=False)
        needed = profile.total_bytes + kv + overhead
        shown = ", ".join(f"{n} {gib(self.free[n])}" for n in chosen[:_NODES_SHOWN])
        shown += ", ..." if len(chosen) > _NODES_SHOWN else ""
        reason = (f"needs {gib(profile.total_bytes)} of weights + {gib(kv)} of KV cache "
                  f"({budget.max_concurrent_requests} requests × {budget.context_length} tokens) + {gib(overhead)} of "
                  f"activations and runtime, {_nodes(len(chosen), ready=True)}{limit} offer {gib(offer)}"
                  + (f" ({shown})" if chosen else ""))
        if offer >= needed:
            reason += f"; no split of {profile.num_layers} layers fits each node's memory"
        return reason


def _proportional_boundaries(memory: Sequence[int], layers: int) -> list[int]:
    """Stage end positions for ``layers`` split in proportion to ``memory`` by the largest
    remainder method, at least one layer per stage."""
    count = len(memory)
    total = sum(memory)
    if total <= 0:
        memory, total = [1] * count, count
    seats = [max(1, layers * m // total) for m in memory]
    # Exact remainders as integers: layers*m - seats*total (bigger = more deserving).
    while sum(seats) > layers:
        i = min((i for i in range(count) if seats[i] > 1), key=lambda i: (layers * memory[i] - seats[i] * total, -i))
        seats[i] -= 1
    while sum(seats) < layers:
        i = max(range(count), key=lambda i: (layers * memory[i] - seats[i] * total, -i))
        seats[i] += 1
    boundaries, end = [], 0
    for seat in seats:
        end += seat
        boundaries.append(end)
    return boundaries


def _nodes(count: int, *, ready: bool = False) -> str:
    word = "Ready node" if ready else "node"
    return f"{count} {word}{'' if count == 1 else 's'}"


def _no_nodes_reason(*, nodes: list[Node], ready: list[Node], selector: dict[str, str]) -> str:
    if not nodes:
        return "no nodes in the cluster"
    if not ready:
        return f"none of the {_nodes(len(nodes))} is Ready"
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
    return f"no Ready node matches nodeSelector {wanted} ({_nodes(len(ready), ready=True)})"


def render_plan(plan: PlacementPlan) -> str:
    """The plan as a table (REPLICA, STAGE, NODE, LAYERS, MEMORY of weights, KV CACHE, OVERHEAD)."""
    rows = [("REPLICA", "STAGE", "NODE", "LAYERS", "MEMORY", "KV CACHE", "OVERHEAD")]
    for a in plan.assignments:
        rows.append((str(a.replica), f"{a.index + 1}/{a.stages}", a.node, str(a.layers), gib(a.memory_bytes),
                     gib(a.kv_cache_bytes), gib(a.overhead_bytes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows] if plan.assignments else []
    if plan.reason:
        lines.append(f"Unschedulable: {plan.reason}")
    return "\n".join(lines)
