"""Re-placement is make-before-break when memory allows: the scheduler writes the new placement as
a new revision of Shards beside the serving one, routes keep using the old one until the new one
is Ready, then the old one is deleted (in-memory store, real model files)."""
import pytest

from exo_ctl.model_builder.build_model import build_model
from exo_ctl.api.resources import ModelDeployment, Node, Shard
from reconciler.controllers.deployment_status import deployment_status, placement_revision
from reconciler.controllers.scheduler import SchedulerController, shard_name
from reconciler.inference.cluster import ready_routes
from reconciler.models.metadata import profile_from_directory
from reconciler.scheduler.placement import place, room_for_both
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.controllers.test_scheduler import GiB, add_node, md_body

MiB = 2**20


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


async def report_ready(store, names=None):
    for shard in store.list("Shard")[0]:
        if names is None or shard["metadata"]["name"] in names:
            await store.submit(make_command("status", ("Shard", "", shard["metadata"]["name"]), body={"status": {
                "phase": "Ready", "progress": 1.0, "observedGeneration": shard["metadata"]["generation"],
                "dataEndpoint": f"127.0.0.1:{9000 + shard['spec']['index']}"}}))


def names(store):
    return sorted(s["metadata"]["name"] for s in store.list("Shard")[0])


def routes(store):
    md = store.get(("ModelDeployment", "default", "tiny"))
    return [[stage.shard for stage in route] for route in ready_routes(md, store.list("Shard")[0])]


async def serving_on_three(tiny_model, *, memory=8 * GiB):
    store = MemoryStore()
    for name in ("a", "b", "c"):
        await add_node(store, name, memory=memory)
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tiny_model)))
    scheduler = SchedulerController(store=store)
    await scheduler.reconcile()
    await report_ready(store)
    await scheduler.reconcile()
    return store, scheduler


async def test_a_fourth_node_gets_a_new_placement_beside_the_serving_one(tiny_model):
    store, scheduler = await serving_on_three(tiny_model)
    old = ["tiny-r0-s0", "tiny-r0-s1", "tiny-r0-s2"]
    await add_node(store, "d")
    await scheduler.reconcile()
    new = ["tiny-v1-r0-s0", "tiny-v1-r0-s1", "tiny-v1-r0-s2", "tiny-v1-r0-s3"]
    assert names(store) == sorted(old + new)
    assert routes(store) == [old]  # the old placement serves while the new one loads
    md = store.get(("ModelDeployment", "default", "tiny"))
    assert md["status"]["readyReplicas"] == 1
    assert {c["type"]: c["status"] for c in md["status"]["conditions"]}["Ready"] == "True"
    await report_ready(store, names=new[:3])
    await scheduler.reconcile()
    assert names(store) == sorted(old + new) and routes(store) == [old]  # not whole yet: nothing removed
    await report_ready(store, names=new[3:])
    await scheduler.reconcile()
    assert names(store) == new and routes(store) == [new]
    assert sorted(s["spec"]["nodeName"] for s in store.list("Shard")[0]) == ["a", "b", "c", "d"]


async def test_without_room_for_both_placements_the_shards_are_moved_in_place(tiny_model):
    profile = profile_from_directory(tiny_model)
    deployment = ModelDeployment.model_validate(md_body(tiny_model))
    plan = place(deployment=deployment, nodes=[node(n, 64 * GiB) for n in "abc"], shards=[], profile=profile)
    stage = max(a.memory_bytes + a.kv_cache_bytes + a.overhead_bytes for a in plan.assignments)
    # One stage of three fits with room, one of three plus one of four does not.
    memory = stage * 13 // 10 + deployment.spec.resources.headroom_bytes
    store, scheduler = await serving_on_three(tiny_model, memory=memory)
    await add_node(store, "d", memory=memory)
    await scheduler.reconcile()
    assert names(store) == ["tiny-r0-s0", "tiny-r0-s1", "tiny-r0-s2", "tiny-r0-s3"]
    assert all(placement_revision(s) == 0 for s in store.list("Shard")[0])


async def test_a_placement_with_a_dead_node_is_replaced_in_place_not_kept_serving(tiny_model):
    store, scheduler = await serving_on_three(tiny_model)
    status = store.get(("Node", "", "b"))["status"]
    await store.submit(make_command("status", ("Node", "", "b"), body={"status": {
        **status, "conditions": [{"type": "Ready", "status": "False"}]}}))
    await scheduler.reconcile()
    assert names(store) == ["tiny-r0-s0", "tiny-r0-s1"]
    assert sorted(s["spec"]["nodeName"] for s in store.list("Shard")[0]) == ["a", "c"]


async def test_a_new_placement_that_changes_again_before_it_is_ready_is_updated_in_place(tiny_model):
    store, scheduler = await serving_on_three(tiny_model)
    await add_node(store, "d")
    await scheduler.reconcile()
    await add_node(store, "e")
    await scheduler.reconcile()
    revisions = sorted({placement_revision(s) for s in store.list("Shard")[0]})
    assert revisions == [0, 1]  # the serving one and one newer, never a third
    newer = [s for s in store.list("Shard")[0] if placement_revision(s) == 1]
    assert sorted(s["spec"]["nodeName"] for s in newer) == ["a", "b", "c", "d", "e"]


def test_later_placement_revisions_put_their_number_before_the_replica():
    deployment = ModelDeployment.model_validate(md_body("/m"))
    assert shard_name(deployment, 0, 1) == "tiny-r0-s1"
    assert shard_name(deployment, 0, 1, revision=3) == "tiny-v3-r0-s1"


def node(name, memory):
    return Node.model_validate({"apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": name},
                                "spec": {"nodeId": name, "address": "127.0.0.1", "apiPort": 1, "raftPort": 2},
                                "status": {"allocatable": {"memory": memory}, "capacity": {"memory": memory},
                                           "conditions": [{"type": "Ready", "status": "True"}]}})


@pytest.mark.parametrize(("memory_mib", "held_mib", "fits"), [
    (4096, 0, True),     # plenty of room
    (4096, 4000, False),  # another deployment fills the node
    (1, 0, False),        # the new stage alone does not fit
])
def test_room_for_both_placements_counts_what_each_node_holds_now(tiny_model, memory_mib, held_mib, fits):
    profile = profile_from_directory(tiny_model)
    deployment = ModelDeployment.model_validate({**md_body(tiny_model), "metadata": {
        "name": "tiny", "namespace": "default", "uid": "u1"}})
    nodes = [node("a", 4096 * MiB), node("b", memory_mib * MiB)]
    plan = place(deployment=deployment, nodes=[nodes[0], node("b", 4096 * MiB)], shards=[], profile=profile)
    held = [Shard.model_validate({"apiVersion": "exo.dev/v1alpha1", "kind": "Shard", "metadata": {"name": "other-r0-s0"},
                                  "spec": {"deployment": "default/other", "replica": 0, "index": 0, "stages": 1,
                                           "layers": {"start": 0, "end": 1}, "totalLayers": 1, "nodeName": "b",
                                           "model": {"source": "/other"}, "memoryBytes": held_mib * MiB}})]
    reason = room_for_both(deployment=deployment, nodes=nodes, shards=held, plan=plan)
    assert (reason is None) == fits
    if not fits:
        assert reason.startswith("node b cannot hold the new placement")


def test_status_counts_a_replica_ready_while_its_newer_placement_loads():
    def shard(name, revision, index, stages, ready):
        labels = {"exo.dev/placement-revision": str(revision)} if revision else {}
        return {"metadata": {"name": name, "generation": 1, "labels": labels},
                "spec": {"replica": 0, "index": index, "stages": stages, "nodeName": "a", "layers": {"start": index, "end": index + 1}},
                "status": {"phase": "Ready" if ready else "Loading", "observedGeneration": 1}}
    md = {"metadata": {"name": "tiny", "generation": 1}, "spec": {"replicas": 1}}
    shards = [shard("o0", 0, 0, 2, True), shard("o1", 0, 1, 2, True),
              shard("n0", 1, 0, 3, True), shard("n1", 1, 1, 3, False), shard("n2", 1, 2, 3, True)]
    status = deployment_status(deployment=md, shards=shards, problem=None, now="2026-01-01T00:00:00Z")
    assert status["readyReplicas"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
