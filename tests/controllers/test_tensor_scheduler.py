"""spec.parallelism.tensor through the scheduler: one Shard per rank on distinct nodes with the
group's ring addresses, families mlx-lm cannot shard refused with a reason naming the family,
and a group placed again when one of its nodes is lost (in-memory store, real model files)."""
import pytest

from exo_ctl.model_builder.build_family import build_family_model
from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers.scheduler import SchedulerController, placement_serving
from exo_ctl.api.resources import Shard, ShardStatus
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore

GiB = 1024**3


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


def node_body(name, *, address="127.0.0.1", ready="True"):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": name},
            "spec": {"nodeId": name, "address": address, "apiPort": 1, "raftPort": 2},
            "status": {"allocatable": {"memory": 8 * GiB}, "capacity": {"memory": 8 * GiB},
                       "conditions": [{"type": "Ready", "status": ready}]}}


def md_body(source, *, tensor=2, strategy="Pack"):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "tp", "namespace": "default"},
            "spec": {"model": {"source": str(source)}, "placement": {"strategy": strategy},
                     "parallelism": {"tensor": tensor}}}


async def setup(source, nodes, **spec):
    store = MemoryStore()
    for index, name in enumerate(nodes):
        await store.submit(make_command("create", ("Node", "", name), body=node_body(name, address=f"10.0.0.{index + 1}")))
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tp"), body=md_body(source, **spec)))
    return store


def ready_condition(store):
    md = store.get(("ModelDeployment", "default", "tp"))
    return {c["type"]: c for c in md["status"]["conditions"]}["Ready"]


def by_name(store):
    return {s["metadata"]["name"]: s["spec"] for s in store.list("Shard")[0]}


async def test_each_rank_of_a_stage_is_a_shard_on_its_own_node_with_the_groups_addresses(tiny_model):
    store = await setup(tiny_model, ["a", "b", "c"])
    await SchedulerController(store=store).reconcile()
    specs = by_name(store)
    assert sorted(specs) == ["tp-r0-s0", "tp-r0-s0-t1"]
    rank0, rank1 = specs["tp-r0-s0"], specs["tp-r0-s0-t1"]
    assert (rank0["tensor"]["rank"], rank1["tensor"]["rank"]) == (0, 1)
    assert rank0["tensor"]["peers"] == rank1["tensor"]["peers"]
    peers = rank0["tensor"]["peers"]
    assert [p["node"] for p in peers] == [rank0["nodeName"], rank1["nodeName"]]
    assert rank0["nodeName"] != rank1["nodeName"]
    hosts = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}
    assert [p["address"].rpartition(":")[0] for p in peers] == [hosts[p["node"]] for p in peers]
    assert rank0["layers"] == rank1["layers"] == {"start": 0, "end": 8}
    ready = ready_condition(store)
    assert ready["status"] == "False" and ready["reason"] == "ShardsLoading"


async def test_memory_per_rank_is_about_half_of_the_stages_weights(tiny_model):
    whole = await setup(tiny_model, ["a"], tensor=1)
    await SchedulerController(store=whole).reconcile()
    (single,) = by_name(whole).values()
    split = await setup(tiny_model, ["a", "b"])
    await SchedulerController(store=split).reconcile()
    ranks = list(by_name(split).values())
    assert len(ranks) == 2
    for rank in ranks:
        assert single["memoryBytes"] / 2 <= rank["memoryBytes"] < single["memoryBytes"]
        assert rank["kvCacheBytes"] * 2 >= single["kvCacheBytes"] > rank["kvCacheBytes"]


async def test_a_family_without_tensor_parallel_sharding_is_refused_naming_the_family(tmp_path):
    gemma = build_family_model("gemma2", tmp_path / "gemma2")
    store = await setup(gemma, ["a", "b"])
    await SchedulerController(store=store).reconcile()
    assert store.list("Shard")[0] == []
    ready = ready_condition(store)
    assert ready["status"] == "False" and ready["reason"] == "TensorParallelUnsupported"
    assert "'gemma2'" in ready["message"] and "spec.parallelism.tensor" in ready["message"]


async def test_too_few_nodes_for_the_group_is_unschedulable_with_the_count(tiny_model):
    store = await setup(tiny_model, ["a"])
    await SchedulerController(store=store).reconcile()
    ready = ready_condition(store)
    assert ready["reason"] == "Unschedulable"
    assert "spec.parallelism.tensor is 2" in ready["message"] and "1 match" in ready["message"]


async def test_a_lost_rank_node_moves_that_rank_and_the_group_gets_new_peers(tiny_model):
    store = await setup(tiny_model, ["a", "b", "c"])
    scheduler = SchedulerController(store=store)
    await scheduler.reconcile()
    before = by_name(store)
    lost = before["tp-r0-s0-t1"]["nodeName"]
    node = store.get(("Node", "", lost))
    await store.submit(make_command("status", ("Node", "", lost), body={"status": {
        **node["status"], "conditions": [{"type": "Ready", "status": "False"}]}}))
    await scheduler.reconcile()
    after = by_name(store)
    assert sorted(after) == ["tp-r0-s0", "tp-r0-s0-t1"]
    assert lost not in {spec["nodeName"] for spec in after.values()}
    assert after["tp-r0-s0"]["tensor"]["peers"] == after["tp-r0-s0-t1"]["tensor"]["peers"]
    assert after["tp-r0-s0"]["tensor"] != before["tp-r0-s0"]["tensor"]


async def test_a_tensor_stage_serves_only_when_its_rank_zero_is_ready(tiny_model):
    store = await setup(tiny_model, ["a", "b"])
    await SchedulerController(store=store).reconcile()
    shards = [Shard.model_validate(s) for s in store.list("Shard")[0]]
    ready = [s.model_copy(update={"status": ShardStatus(phase="Ready", observedGeneration=s.metadata.generation)})
             for s in shards]
    assert placement_serving(ready, ready_nodes={"a", "b"})
    followers = [s for s in ready if s.spec.tensor.rank > 0]
    assert not placement_serving(followers, ready_nodes={"a", "b"})
