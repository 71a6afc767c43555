"""/metrics, /sd and the request-metrics middleware, on an API app over the in-memory store."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from reconciler.metrics import NodeMetrics
from reconciler.observability import StateSources, install_node_metrics, raft_families
from reconciler.server import create_app
from reconciler.server.metrics_routes import UNMATCHED, add_metrics_routes
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from reconciler.store.state import StoreState

from tests.server.conftest import NodeLikeServer
from tests.server.server_helpers import AUTH, MD_PATH, TOKEN, deployment, node, shard

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def metrics() -> NodeMetrics:
    return NodeMetrics(node="node-a")


@pytest.fixture
async def client(store: MemoryStore, metrics: NodeMetrics) -> AsyncIterator[TestClient]:
    app = create_app(store=store, token=TOKEN, node_name="node-a", watch_disconnect_check_s=0.05)
    add_metrics_routes(app, metrics=metrics, token=TOKEN)
    sources = StateSources(store=store, node_name="node-a", lease_ages=lambda: {"node-a": 0.25, "node-b": 4.5},
                           queue_depth=lambda: 2, host_memory_available=lambda: 3 * 2**30)
    install_node_metrics(metrics, sources=sources, app=app)
    async with TestClient(NodeLikeServer(app, host="127.0.0.1")) as test_client:
        yield test_client


async def put(store: MemoryStore, obj: dict[str, Any], status: dict[str, Any] | None = None) -> None:
    key = (obj["kind"], obj["metadata"].get("namespace", "default" if obj["kind"] == "ModelDeployment" else ""),
           obj["metadata"]["name"])
    await store.submit(make_command("create", key, body=obj))
    if status is not None:
        await store.submit(make_command("status", key, body={"status": status}))


def ready_node(name: str, *, ready: bool = True, port: int = 52415, role: str = "follower",
               scheme: str = "http") -> tuple[dict, dict]:
    obj = node(name)
    obj["spec"]["apiPort"] = port
    obj["spec"]["apiScheme"] = scheme
    obj["metadata"]["labels"] = {"exo.dev/arch": "arm64"}
    status = {"role": role, "capacity": {"memory": 16 * 2**30}, "allocatable": {"memory": 12 * 2**30},
              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return obj, status


async def scrape(client: TestClient) -> Samples:
    response = await client.get("/metrics", headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_and_sd_refuse_a_scraper_without_the_cluster_token(client: TestClient) -> None:
    for path in ("/metrics", "/sd"):
        response = await client.get(path)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "credentials_file" in (await response.json())["message"]
        wrong = await client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401


async def test_metrics_describe_raft_the_store_nodes_and_shards_at_scrape_time(client: TestClient,
                                                                               store: MemoryStore) -> None:
    for name, ready in (("node-a", True), ("node-b", False)):
        await put(store, *ready_node(name, ready=ready))
    await put(store, deployment("llama"), {"readyReplicas": 1, "conditions": [{"type": "Ready", "status": "True"}]})
    await put(store, shard("llama-0-0"), {"phase": "Loading", "bytesLoaded": 4096})
    samples = await scrape(client)

    assert value(samples, "exo_raft_leader") == 1
    assert value(samples, "exo_store_objects", kind="Node") == 2
    assert value(samples, "exo_store_revision") == store.revision
    assert value(samples, "exo_node_ready", node="node-a") == 1
    assert value(samples, "exo_node_ready", node="node-b") == 0
    assert value(samples, "exo_node_memory_total_bytes", node="node-b") == 16 * 2**30
    assert value(samples, "exo_node_memory_allocatable_bytes", node="node-a") == 12 * 2**30
    assert value(samples, "exo_node_memory_available_bytes", node="node-a") == 3 * 2**30
    assert value(samples, "exo_node_lease_age_seconds", node="node-b") == 4.5
    assert value(samples, "exo_controller_queue_depth") == 2
    shard_labels = {"shard": "llama-0-0", "deployment": "default/llama", "node": "node-a"}
    phases = {p: value(samples, "exo_shard_phase", **shard_labels, phase=p) for p in ("Pending", "Loading", "Ready", "Failed")}
    assert phases == {"Pending": 0, "Loading": 1, "Ready": 0, "Failed": 0}
    assert value(samples, "exo_shard_bytes_loaded", **shard_labels) == 4096
    assert (value(samples, "exo_shard_layer_start", **shard_labels), value(samples, "exo_shard_layer_end", **shard_labels)) == (0, 16)
    assert value(samples, "exo_deployment_ready", deployment="default/llama") == 1
    assert value(samples, "exo_deployment_ready_replicas", deployment="default/llama") == 1
    # Every write above went through Store.submit: each commit was timed.
    assert value(samples, "exo_raft_apply_seconds_count") == len(store.commands)


async def test_a_downloading_shard_and_the_weights_bytes_by_source_are_scraped(client: TestClient, store: MemoryStore,
                                                                               metrics: NodeMetrics) -> None:
    await put(store, shard("llama-0-0"), {"phase": "Downloading", "bytesDownloaded": 10, "bytesToDownload": 40})
    metrics.weights_fetched("peer", 3000)
    metrics.weights_fetched("hub", 500)
    metrics.weights_fetched("peer", 1000)
    metrics.weights_refused("peer", 64)
    metrics.weights_served(2048)
    metrics.watch_model_cache(lambda: [{"name": "a", "bytes": 700}, {"name": "b", "bytes": 300}])
    samples = await scrape(client)
    shard_labels = {"shard": "llama-0-0", "deployment": "default/llama", "node": "node-a"}
    assert value(samples, "exo_shard_phase", **shard_labels, phase="Downloading") == 1
    assert value(samples, "exo_shard_phase", **shard_labels, phase="Loading") == 0
    assert value(samples, "exo_weights_fetched_bytes_total", source="peer") == 4000
    assert value(samples, "exo_weights_fetched_bytes_total", source="hub") == 500
    assert value(samples, "exo_weights_refused_bytes_total", source="peer") == 64
    assert value(samples, "exo_weights_served_bytes_total") == 2048
    assert value(samples, "exo_model_cache_bytes") == 1000


async def test_requests_are_counted_by_route_template_method_and_code_never_by_raw_path(client: TestClient) -> None:
    for name in ("alpha", "beta"):
        assert (await client.get(f"{MD_PATH}/{name}", headers=AUTH)).status == 404
    assert (await client.get(MD_PATH)).status == 401
    assert (await client.get("/no/such/page/4711")).status == 404
    samples = await scrape(client)

    template = next(route for (name, labels) in samples if name == "exo_api_requests_total"
                    for key, route in labels if key == "route" and route.endswith("{name}"))
    assert "{namespace}" in template
    assert value(samples, "exo_api_requests_total", route=template, method="GET", code="404") == 2
    assert value(samples, "exo_api_request_seconds_count", route=template, method="GET") == 2
    collection = template.rsplit("/", 1)[0]
    assert value(samples, "exo_api_requests_total", route=collection, method="GET", code="401") == 1
    assert value(samples, "exo_api_requests_total", route=UNMATCHED, method="GET", code="404") == 1
    assert not any("/alpha" in str(labels) or "4711" in str(labels) for _, labels in samples)


async def test_open_watch_streams_are_counted_and_labelled_watch(client: TestClient) -> None:
    response = await client.get(f"{MD_PATH}?watch=true", headers=AUTH)
    assert response.status == 200
    assert value(await scrape(client), "exo_watch_streams") == 1
    response.close()
    def counted(samples) -> bool:
        return any(name == "exo_api_requests_total" and ("method", "WATCH") in labels for name, labels in samples)

    for _ in range(100):  # the stream's end and its request count land as the handler unwinds
        samples = await scrape(client)
        if value(samples, "exo_watch_streams") == 0 and counted(samples):
            break
        await asyncio.sleep(0.02)
    assert value(samples, "exo_watch_streams") == 0
    assert counted(samples)


async def test_sd_lists_every_ready_node_as_a_target_with_its_name_role_and_scheme(client: TestClient,
                                                                                   store: MemoryStore) -> None:
    await put(store, *ready_node("node-b", port=52419, role="leader", scheme="https"))
    await put(store, *ready_node("node-a", port=52415))
    await put(store, *ready_node("node-c", ready=False))
    await put(store, node("node-d"))  # registered, never judged Ready
    response = await client.get("/sd", headers=AUTH)
    assert response.status == 200
    groups = await response.json()
    assert [g["targets"] for g in groups] == [["127.0.0.1:52415"], ["127.0.0.1:52419"]]
    assert groups[1]["labels"] == {"node": "node-b", "__meta_exo_node_role": "leader", "__meta_exo_node_id": "0f6c",
                                   "__scheme__": "https", "__meta_exo_node_label_exo_dev_arch": "arm64"}
    assert groups[0]["labels"]["__scheme__"] == "http"


def test_raft_gauges_report_this_nodes_view_of_term_log_and_membership() -> None:
    status = {"leader": False, "isLeader": False, "quorum": True, "term": 7, "commitIndex": 41, "lastApplied": 40,
              "members": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}
    values = {family.name: family.samples[0].value for family in raft_families(status, StoreState())
              if family.samples and not family.samples[0].labels}
    assert values == {"exo_raft_leader": 0, "exo_raft_quorum": 1, "exo_raft_term": 7, "exo_raft_commit_index": 41,
                      "exo_raft_last_applied": 40, "exo_raft_members": 3, "exo_store_revision": 0}
