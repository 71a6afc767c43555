"""``ClusterBackend`` over the in-memory store: what a client is told while shards move, and how
often a tokenizer that cannot be loaded is retried."""
from __future__ import annotations

import asyncio

import pytest

from reconciler.inference import cluster
from reconciler.inference.backend import NotReady
from reconciler.inference.cluster import TOKENIZER_RETRY_S, ClusterBackend
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore


def deployment(name: str, *, ready: str) -> dict:
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"source": f"/models/{name}"}, "replicas": 1},
            "status": {"conditions": [{"type": "Ready", "status": ready, "reason": "AllShardsReady",
                                       "message": "1/1 replicas ready"}]}}


async def create(store: MemoryStore, body: dict) -> None:
    await store.submit(make_command("create", (body["kind"], body["metadata"].get("namespace", ""),
                                               body["metadata"]["name"]), body=body))


async def test_a_ready_deployment_whose_shards_are_moving_is_not_ready_without_claiming_all_is_well():
    store = MemoryStore()
    await create(store, deployment("tiny", ready="True"))
    backend = ClusterBackend(store=store)
    with pytest.raises(NotReady) as refused:
        backend.resolve("tiny")
    assert "being placed again" in refused.value.message
    assert "replicas ready" not in refused.value.message
    await backend.close()


async def test_a_tokenizer_that_fails_to_load_is_retried_after_a_pause_not_on_every_store_change(monkeypatch):
    calls = []

    def failing_load(source, revision):
        calls.append(source)
        raise OSError(f"{source}: no tokenizer here")

    monkeypatch.setattr(cluster, "_load_tokenizer", failing_load)
    now = [100.0]
    store = MemoryStore()
    backend = ClusterBackend(store=store, monotonic=lambda: now[0])
    await create(store, deployment("tiny", ready="True"))
    for index in range(5):  # leases change the store every second; statuses often
        await asyncio.sleep(0.05)
        await create(store, {"kind": "Lease", "metadata": {"name": f"lease-{index}"}})
        await store.submit(make_command("status", ("ModelDeployment", "default", "tiny"),
                                        body={"status": {**deployment("tiny", ready="True")["status"], "readyReplicas": index}}))
    await asyncio.sleep(0.05)
    assert calls == ["/models/tiny"]
    now[0] += TOKENIZER_RETRY_S + 1
    await store.submit(make_command("status", ("ModelDeployment", "default", "tiny"),
                                    body={"status": deployment("tiny", ready="True")["status"]}))
    await asyncio.sleep(0.05)
    assert calls == ["/models/tiny", "/models/tiny"]
    await backend.close()


async def test_only_ready_deployments_have_their_tokenizer_prefetched_and_lease_renewals_fetch_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(cluster, "_load_tokenizer", lambda source, revision: calls.append(source) or object())
    store = MemoryStore()
    backend = ClusterBackend(store=store)
    await create(store, deployment("loading", ready="False"))
    await create(store, {"kind": "Lease", "metadata": {"name": "node-a"}})
    await asyncio.sleep(0.05)
    assert calls == []
    await create(store, deployment("serving", ready="True"))
    await asyncio.sleep(0.05)
    assert calls == ["/models/serving"]
    await backend.close()
