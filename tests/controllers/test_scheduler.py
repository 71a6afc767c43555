"""The scheduler turns deployments into shards covering every layer, re-places them when nodes
change, reports conditions, and cleans up after deletes (in-memory store, real model files)."""
import shutil

import pytest

from exo_ctl.model_builder.build_model import build_model
from exo_ctl.api.resources import ModelDeployment
from reconciler.controllers.scheduler import MAX_NAME, SchedulerController, shard_name
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore

GiB = 1024**3


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


def node_body(name, memory=8 * GiB, ready="True", scheme="http"):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": name},
            "spec": {"nodeId": name, "address": "127.0.0.1", "apiPort": 1, "raftPort": 2, "apiScheme": scheme},
            "status": {"allocatable": {"memory": memory}, "capacity": {"memory": memory},
                       "conditions": [{"type": "Ready", "status": ready}]}}


def md_body(source, strategy="Spread", name="tiny", namespace="default"):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"source": str(source)}, "placement": {"strategy": strategy}}}


async def add_node(store, name, **kw):
    await store.submit(make_command("create", ("Node", "", name), body=node_body(name, **kw)))


def shards(store):
    return sorted(store.list("Shard")[0], key=lambda s: s["spec"]["index"])


def condition(store, kind, name="tiny", namespace="default"):
    md = store.get(("ModelDeployment", namespace, name))
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
    await store.submit(make_command("status", ("Node", "", "b"), body={"status": node_body("b", ready="False")["status"]}))
    await scheduler.reconcile()
    assert [s["spec"]["nodeName"] for s in shards(store)] == ["a", "c"]
    covered = [layer for s in shards(store) for layer in range(s["spec"]["layers"]["start"], s["spec"]["layers"]["end"])]
    assert covered == list(range(8))


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_shards_reported_ready_make_the_deployment_ready_at_the_nodes_own_scheme(tiny_model, scheme):
    store = MemoryStore()
    await add_node(store, "a", scheme=scheme)
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
    assert md["status"]["endpoint"] == f"{scheme}://127.0.0.1:1/v1"  # node a's API (apiPort 1 in this test)
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


async def apply_md(store, source, *, name, namespace="default", strategy="Pack"):
    body = md_body(source, strategy=strategy, name=name, namespace=namespace)
    await store.submit(make_command("apply", ("ModelDeployment", namespace, name), body=body))


def owners(store):
    return {s["metadata"]["name"]: s["spec"]["deployment"] for s in store.list("Shard")[0]}


async def test_a_dotted_name_in_default_and_the_same_words_split_by_namespace_both_get_shards(tiny_model):
    store = MemoryStore()
    await add_node(store, "a")
    await apply_md(store, tiny_model, name="a.b")
    await apply_md(store, tiny_model, name="a", namespace="b")
    await SchedulerController(store=store).reconcile()
    names = owners(store)
    assert sorted(names.values()) == ["b/a", "default/a.b"]
    assert names["a.b-r0-s0"] == "default/a.b"
    assert condition(store, "Ready", name="a", namespace="b")["reason"] == "ShardsLoading"
    assert condition(store, "Ready", name="a.b")["reason"] == "ShardsLoading"


def test_shard_names_stay_readable_and_within_the_dns_limit():
    def named(name, namespace):
        return ModelDeployment.model_validate(md_body("/m", name=name, namespace=namespace))

    assert shard_name(named("tiny", "default"), 1, 2) == "tiny-r1-s2"
    assert shard_name(named("a", "b"), 0, 0).startswith("a.b-") and shard_name(named("a", "b"), 0, 0).endswith("-r0-s0")
    assert shard_name(named("a", "b"), 0, 0) != shard_name(named("a.b", "default"), 0, 0)
    long_names = {shard_name(named("x" * 250 + tail, "team"), 0, 0) for tail in ("a", "b")}
    assert len(long_names) == 2 and all(len(n) <= MAX_NAME for n in long_names)


async def test_a_shard_name_held_by_another_deployment_is_reported_not_taken(tiny_model):
    store = MemoryStore()
    await add_node(store, "a")
    await apply_md(store, tiny_model, name="a", namespace="b")
    scheduler = SchedulerController(store=store)
    await scheduler.reconcile()
    taken = next(iter(owners(store)))
    clash = taken.removesuffix("-r0-s0")  # a default-namespace name spelling the same shard name
    await apply_md(store, tiny_model, name=clash)
    await scheduler.reconcile()
    assert owners(store) == {taken: "b/a"}
    ready = condition(store, "Ready", name=clash)
    assert ready["status"] == "False" and ready["reason"] == "ShardNameConflict"
    assert taken in ready["message"] and "b/a" in ready["message"]


async def test_a_node_that_turns_ready_while_the_pass_reads_the_model_gets_layers_in_that_pass(tiny_model):
    """The first pass of a deployment reads the model's headers off the event loop; the nodes it
    then plans over are the ones there are after that read, not before it."""
    import asyncio

    from reconciler.controllers.model_info import local_model_info

    store = MemoryStore()
    for name in ("a", "b"):
        await add_node(store, name)
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(tiny_model)))
    loop = asyncio.get_running_loop()

    def slow_copy(*args, **kwargs):  # node c joins while the leader reads its own copy's headers
        asyncio.run_coroutine_threadsafe(add_node(store, "c"), loop).result(timeout=10)
        return local_model_info(*args, **kwargs)

    await SchedulerController(store=store, local_info=slow_copy).reconcile()
    assert [s["spec"]["nodeName"] for s in shards(store)] == ["a", "b", "c"]


async def test_two_deployments_placed_in_one_pass_do_not_count_the_same_free_memory(tiny_model):
    store = MemoryStore()
    await add_node(store, "big", memory=64 * GiB)
    await store.submit(make_command("apply", ("ModelDeployment", "default", "probe"),
                                    body=md_body(tiny_model, name="probe")))
    await SchedulerController(store=store).reconcile()
    one = sum(s["spec"]["memoryBytes"] + s["spec"]["kvCacheBytes"] + s["spec"]["overheadBytes"]
              for s in store.list("Shard")[0])
    room = 512 * 2**20 + one + one // 2  # the default headroom and one deployment's stages, not two

    store = MemoryStore()
    for name in ("a", "b"):
        await add_node(store, name, memory=room)
    for name in ("first", "second"):
        body = md_body(tiny_model, name=name, strategy="Pack")
        await store.submit(make_command("apply", ("ModelDeployment", "default", name), body=body))
    await SchedulerController(store=store).reconcile()
    placed = {s["spec"]["deployment"]: s["spec"]["nodeName"] for s in store.list("Shard")[0]}
    assert sorted(placed.values()) == ["a", "b"], placed  # one each: neither node holds both
