"""What a node exports about the state of things, computed at scrape time.

Two sorts of series come out of here:

- about this node itself (no ``node`` label; Prometheus adds the target's ``node`` label):
  Raft role, term, commit index, membership, store revision and objects by kind, open watch
  streams, controller queue depth;
- about the cluster, read from this node's replica of the store (a ``node``/``shard``/
  ``deployment`` label names what the series describes): Node readiness and memory, Shard phase,
  layers and bytes, deployment readiness, and, on the leader only, the lease age of every node.
  Every node exports the same cluster series, so one reachable node is enough; dashboards
  aggregate them with ``max by (...)``. The scrape config keeps these labels (``honor_labels``).

The families are built by pure functions of (store state, cluster status); ``install_node_metrics``
wires them and the event-side observers (Raft commit latency, pipeline hops) into ``NodeMetrics``.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily

from reconciler.datapath.pipeline import PipelineClient
from reconciler.metrics import PHASES, NodeMetrics, gauge
from reconciler.server.keys import WATCHES
from reconciler.store.base import Store
from reconciler.store.state import StoreState


def _condition(obj: Mapping[str, Any], kind: str) -> bool:
    for condition in (obj.get("status") or {}).get("conditions", []):
        if condition.get("type") == kind:
            return condition.get("status") == "True"
    return False


def _objects(state: StoreState, kind: str) -> list[Mapping[str, Any]]:
    return sorted((obj for (k, _, _), obj in state.objects.items() if k == kind),
                  key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))


def raft_families(cluster: Mapping[str, Any], state: StoreState) -> list[GaugeMetricFamily]:
    """This node's view of Raft and its replica (``cluster`` is ``Store.cluster_status()``)."""
    leader = gauge("exo_raft_leader", "1 if this node is the Raft leader, else 0")
    leader.add_metric([], 1.0 if cluster.get("isLeader", cluster.get("leader")) else 0.0)
    quorum = gauge("exo_raft_quorum", "1 if this node sees a leader with a majority, else 0")
    quorum.add_metric([], 1.0 if cluster.get("quorum") else 0.0)
    families = [leader, quorum]
    for key, name, doc in (("term", "exo_raft_term", "Current Raft term"),
                           ("commitIndex", "exo_raft_commit_index", "Highest log index known to be committed"),
                           ("lastApplied", "exo_raft_last_applied", "Highest log index applied to this replica"),
                           ("diverged", "exo_replica_diverged", "1 while this replica disagrees with the majority"),
                           ("resyncs", "exo_replica_resyncs", "Re-syncs from the leader after a divergence")):
        if key in cluster:
            family = gauge(name, doc)
            family.add_metric([], float(cluster[key]))
            families.append(family)
    members = gauge("exo_raft_members", "Voting members of the Raft group, as this node sees it")
    members.add_metric([], float(len(cluster.get("members") or ()) or 1))
    revision = gauge("exo_store_revision", "Store revision of this node's replica (bumped by every write)")
    revision.add_metric([], float(state.revision))
    objects = gauge("exo_store_objects", "Objects in this node's replica, by kind", ["kind"])
    for kind, count in sorted(Counter(k for (k, _, _) in state.objects).items()):
        objects.add_metric([kind], float(count))
    return [*families, members, revision, objects]


def node_families(state: StoreState, *, lease_ages: Mapping[str, float]) -> list[GaugeMetricFamily]:
    """Every Node's readiness and memory from the replica, and lease ages as the leader sees them."""
    ready = gauge("exo_node_ready", "1 if the Node's Ready condition is True, else 0", ["node"])
    total = gauge("exo_node_memory_total_bytes", "Memory of the node (capacity.memory)", ["node"])
    allocatable = gauge("exo_node_memory_allocatable_bytes",
                        "Memory the scheduler may place layers in (allocatable.memory)", ["node"])
    for node in _objects(state, "Node"):
        name = node["metadata"]["name"]
        status = node.get("status") or {}
        ready.add_metric([name], 1.0 if _condition(node, "Ready") else 0.0)
        if (memory := (status.get("capacity") or {}).get("memory")) is not None:
            total.add_metric([name], float(memory))
        if (memory := (status.get("allocatable") or {}).get("memory")) is not None:
            allocatable.add_metric([name], float(memory))
    families = [ready, total, allocatable]
    if lease_ages:
        ages = gauge("exo_node_lease_age_seconds",
                     "Time since the leader last saw the node renew its lease (leader only)", ["node"])
        for name, age in sorted(lease_ages.items()):
            ages.add_metric([name], age)
        families.append(ages)
    return families


def shard_families(state: StoreState) -> list[GaugeMetricFamily]:
    """The shard map (layers on nodes), each shard's phase one-hot, and deployment readiness."""
    labels = ["shard", "deployment", "node"]
    phase = gauge("exo_shard_phase", "1 for the shard's current phase, 0 for the others", [*labels, "phase"])
    loaded = gauge("exo_shard_bytes_loaded", "Bytes of weights the shard holds", labels)
    start = gauge("exo_shard_layer_start", "First layer of the shard", labels)
    end = gauge("exo_shard_layer_end", "One past the last layer of the shard", labels)
    for shard in _objects(state, "Shard"):
        spec, status = shard["spec"], shard.get("status") or {}
        values = [shard["metadata"]["name"], spec["deployment"], spec["nodeName"]]
        current = status.get("phase", "Pending")
        for name in PHASES:
            phase.add_metric([*values, name], 1.0 if name == current else 0.0)
        loaded.add_metric(values, float(status.get("bytesLoaded") or 0))
        start.add_metric(values, float(spec["layers"]["start"]))
        end.add_metric(values, float(spec["layers"]["end"]))
    ready = gauge("exo_deployment_ready", "1 if the ModelDeployment's Ready condition is True", ["deployment"])
    desired = gauge("exo_deployment_replicas", "Replicas the ModelDeployment asks for", ["deployment"])
    ready_replicas = gauge("exo_deployment_ready_replicas", "Replicas whose every shard is Ready", ["deployment"])
    for deployment in _objects(state, "ModelDeployment"):
        meta = deployment["metadata"]
        key = [f"{meta.get('namespace') or 'default'}/{meta['name']}"]
        ready.add_metric(key, 1.0 if _condition(deployment, "Ready") else 0.0)
        desired.add_metric(key, float(deployment["spec"].get("replicas", 1)))
        ready_replicas.add_metric(key, float((deployment.get("status") or {}).get("readyReplicas") or 0))
    return [phase, loaded, start, end, ready, desired, ready_replicas]


@dataclass(frozen=True)
class StateSources:
    """Where the scrape-time collector reads this node's parts (callables: the controllers are
    created after the HTTP app)."""
    store: Store
    node_name: str
    lease_ages: Callable[[], Mapping[str, float]]
    queue_depth: Callable[[], int]
    host_memory_available: Callable[[], int] = lambda: psutil.virtual_memory().available


def collect_state(sources: StateSources) -> Iterable[GaugeMetricFamily]:
    store = sources.store
    state = store.state
    yield from raft_families(store.cluster_status(), state)
    yield from node_families(state, lease_ages=sources.lease_ages())
    yield from shard_families(state)
    queue = gauge("exo_controller_queue_depth", "Controllers woken and waiting to run a pass")
    queue.add_metric([], float(sources.queue_depth()))
    available = gauge("exo_node_memory_available_bytes", "Free memory of this node's host now", ["node"])
    available.add_metric([sources.node_name], float(sources.host_memory_available()))
    yield queue
    yield available


def install_node_metrics(metrics: NodeMetrics, *, sources: StateSources, app: web.Application,
                         pipeline: PipelineClient | None = None) -> None:
    """Register the scrape-time collector and the event observers of one node (``app`` is the
    node's API app: its open watch streams are counted)."""
    watches = app[WATCHES]
    metrics.add_state_collector(lambda: collect_state(sources))
    metrics.watch_streams.set_function(lambda: watches.open_count)
    sources.store.commit_observer = metrics.raft_apply_seconds.observe
    if pipeline is not None:
        pipeline.hop_observer = metrics.hop_seconds.observe
