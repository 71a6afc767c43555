"""The scheduler turns deployments into shards covering every layer, re-places them when nodes
change, reports conditions, and cleans up after deletes (in-memory store, real model files)."""
import shutil

import pytest

from examples.build_model import build_model
from reconciler.controllers.scheduler import SchedulerController
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore

GiB = 1024**3


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


def node_body(name, memory=8 * GiB, ready="True"):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": name},
            "spec": {"nodeId": name, "address": "127.0.0.1", "apiPort": 1, "raftPort": 2},
            "status": {"allocatable": {"memory": memory}, "capacity": {"memory": memory},
                       "conditions": [{"type": "Ready", "status": ready}]}}


def md_body(source, strategy="Spread", name="tiny"):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"source": str(source)}, "placement": {"strategy": strategy}}}


async def add_node(store, name, **kw):
    await store.submit(make_command("create", ("Node", "", name), body=node_body(name, **kw)))


def shards(store):
    return sorted(store.list("Shard")[0], key=lambda s: s["spec"]["index"])


def condition(store, kind, name="tiny"):
    md = store.get(("ModelDeployment", "default", name))
    return {c["type"]: c for c in md["status"]["conditions"]}[kind]


async def test_spread_deployment_gets_shards_covering_every_layer_once(tiny_model):
    store = MemoryStore()
    for name in ("a", "b", "c"):
        await add_node(store, name)
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tiny_model)))
    await SchedulerController(store=store).reconcile()
    layers = [(s["spec"]["layers"]["start"], s["spec"]["layers"]["end"]) for s in shards(store)]
    assert [s["spec"]["nodeName"] for s in shards(store)] == ["a", "b", "c"]
    covered = [layer for start, end in layers for layer in range(start, end)]
    assert covered == list(range(shards(store)[0]["spec"]["totalLayers"]))
    ready = condition(store, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ShardsLoading"


async def test_not_ready_node_loses_its_shard_to_the_survivors(tiny_model):
    store = MemoryStore()
    for name in ("a", "b", "c"):
        await add_node(store, name)
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tiny_model)))
    scheduler = SchedulerController(store=store)
    await scheduler.reconcile()
    live = store.get(("Node", "", "b"))
    await store.submit(make_command("status", ("Node", "", "b"), body={"status": node_body("b", ready="False")["status"]}))
    await scheduler.reconcile()
    assert [s["spec"]["nodeName"] for s in shards(store)] == ["a", "c"]
    covered = [layer for s in shards(store) for layer in range(s["spec"]["layers"]["start"], s["spec"]["layers"]["end"])]
    assert covered == list(range(8))


async def test_shards_reported_ready_make_the_deployment_ready(tiny_model):
    store = MemoryStore()
    await add_node(store, "a")
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tiny_model)))
    scheduler = SchedulerController(store=store)
    await scheduler.reconcile()
    for shard in shards(store):
        await store.submit(make_command("status", ("Shard", "", shard["metadata"]["name"]), body={"status": {
            "phase": "Ready", "progress": 1.0, "observedGeneration": shard["metadata"]["generation"]}}))
    await scheduler.reconcile()
    md = store.get(("ModelDeployment", "default", "tiny"))
    assert condition(store, "Ready")["status"] == "True"
    assert md["status"]["readyReplicas"] == 1 and md["status"]["observedGeneration"] == 1
    assert md["status"]["endpoint"] == "http://127.0.0.1:1/v1"  # node a's API (apiPort 1 in this test)
    assert condition(store, "Stalled")["status"] == "False" and condition(store, "Reconciling")["status"] == "False"


async def test_unschedulable_deployment_says_why_and_creates_nothing(tiny_model):
    store = MemoryStore()
    await add_node(store, "a", memory=1024)
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tiny_model)))
    await SchedulerController(store=store).reconcile()
    ready = condition(store, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Unschedulable"
    assert "needs" in ready["message"] and "offer" in ready["message"]
    assert condition(store, "Stalled")["status"] == "True"
    assert shards(store) == []


async def test_bad_model_path_is_reported_as_model_not_found(tmp_path):
    store = MemoryStore()
    await add_node(store, "a")
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tmp_path / "missing")))
    await SchedulerController(store=store).reconcile()
    ready = condition(store, "Ready")
    assert ready["reason"] == "ModelNotFound" and "missing" in ready["message"]


async def test_deleting_the_deployment_deletes_its_shards(tiny_model):
    store = MemoryStore()
    await add_node(store, "a")
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tiny_model)))
    scheduler = SchedulerController(store=store)
    await scheduler.reconcile()
    assert shards(store)
    await store.submit(make_command("delete", ("ModelDeployment", "default", "tiny")))
    await scheduler.reconcile()
    assert shards(store) == []


async def test_a_settled_deployment_is_not_recomputed_until_its_inputs_change(tiny_model):
    store = MemoryStore()
    await add_node(store, "a")
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tiny_model)))
    scheduler = SchedulerController(store=store)
    for _ in range(3):  # create shards, write status, then settle
        await scheduler.reconcile()
    settled_revision = store.revision
    await scheduler.reconcile()
    assert store.revision == settled_revision and scheduler._inputs  # nothing recomputed, nothing written
    await add_node(store, "b")  # a new node is a new input: Spread takes it
    await scheduler.reconcile()
    assert {s["spec"]["nodeName"] for s in shards(store)} == {"a", "b"}


async def test_a_missing_model_is_looked_for_again_after_the_retry_interval(tmp_path, tiny_model):
    store = MemoryStore()
    await add_node(store, "a")
    now = [0.0]
    missing = tmp_path / "later"
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(missing)))
    scheduler = SchedulerController(store=store, clock=lambda: now[0])
    await scheduler.reconcile()
    assert condition(store, "Ready")["reason"] == "ModelNotFound"
    shutil.copytree(tiny_model, missing)
    now[0] = 10.0
    await scheduler.reconcile()
    assert len(shards(store)) == 1 and condition(store, "Ready")["reason"] == "ShardsLoading"
