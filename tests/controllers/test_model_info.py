"""ModelInfo in the replicated state: nodes holding a model on disk publish it (headers, then every
tensor's digest), the scheduler plans only from it (its own copy, the hub, or a node's record) and
says why when nobody has it (in-memory store, real model files, a loopback hub for the real
huggingface_hub code)."""
import asyncio
import threading

import pytest
from huggingface_hub import constants

from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers.manager import ControllerManager
from reconciler.controllers.model_info import (
    ModelInfoCollector,
    ModelInfoPublisher,
    create_model_info,
    has_digests,
    local_model_info,
    stored_model_info,
)
from reconciler.controllers.scheduler import SchedulerController
from reconciler.models.catalog import ModelNotFound
from reconciler.models.hub import HubUnreachable, ModelAccessDenied
from reconciler.models.metadata import profile_from_directory
from reconciler.models.model_info import MODEL_INFO_KIND, info_from_directory, model_info_name, profile_from_info
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.controllers.test_scheduler import add_node, md_body, node_body
from tests.fake_hub import FakeHub
from tests.model_files import TWO_LAYER_LLAMA, write_model

ELSEWHERE = "hf://org/tiny"  # a model this process has no copy of (no HF cache entry)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


@pytest.fixture(autouse=True)
def empty_hf_cache(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))


async def eventually(check, *, what, timeout=60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := check()):
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)
    return result


async def deployed(source, nodes=("a",)):
    store = MemoryStore()
    for name in nodes:
        await add_node(store, name)
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(source)))
    return store


def condition(store, kind, name="tiny"):
    """The deployment's condition of this type (None before the scheduler wrote any)."""
    status = store.get(("ModelDeployment", "default", name)).get("status") or {}
    return {c["type"]: c for c in status.get("conditions", [])}.get(kind)


def record(store, source):
    found = stored_model_info(store, source, None)
    return found[0] if found else None


def no_copy(*args, **kwargs):
    return None


class Spy:
    """A node's local_info that remembers how it was asked (digests or not)."""

    def __init__(self, answer=local_model_info):
        self.answer, self.asked = answer, []

    def __call__(self, source, revision, *, node_name, digests):
        self.asked.append(digests)
        return self.answer(source, revision, node_name=node_name, digests=digests)


def shards_of(store):
    return sorted((s["metadata"]["name"], s["spec"]["nodeName"], s["spec"]["layers"]["start"], s["spec"]["layers"]["end"])
                  for s in store.list("Shard")[0])


# --- the publisher -----------------------------------------------------------------------------

async def test_a_node_with_the_model_on_disk_publishes_it_with_every_tensor_digest(tiny_model):
    store = await deployed(tiny_model)
    await ModelInfoPublisher(store=store, node_name="a").reconcile()
    spec = await eventually(lambda: (r := record(store, str(tiny_model))) and has_digests(r) and r,
                            what="a ModelInfo with digests")
    assert spec.origin == "node/a"
    assert spec == info_from_directory(tiny_model, source=str(tiny_model), revision=None, origin="node/a")


async def test_a_node_without_the_model_publishes_nothing(tiny_model):
    store = await deployed(tiny_model)
    spy = Spy(no_copy)
    await ModelInfoPublisher(store=store, node_name="b", local_info=spy).reconcile()
    await eventually(lambda: spy.asked, what="the node to look at its disk")
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert store.list(MODEL_INFO_KIND)[0] == []


async def test_a_record_from_headers_is_completed_with_digests_by_the_node_it_came_from(tiny_model):
    store = await deployed(tiny_model)
    await SchedulerController(store=store, node_name="a").reconcile()  # the leader: headers, at once
    quick = record(store, str(tiny_model))
    assert quick.origin == "node/a" and not has_digests(quick) and store.list("Shard")[0]
    uid = store.list(MODEL_INFO_KIND)[0][0]["metadata"]["uid"]
    await ModelInfoPublisher(store=store, node_name="a").reconcile()
    full = await eventually(lambda: (r := record(store, str(tiny_model))) and has_digests(r) and r,
                            what="the digests")
    assert store.list(MODEL_INFO_KIND)[0][0]["metadata"]["uid"] == uid
    assert profile_from_info(full) == profile_from_info(quick)


async def test_another_nodes_record_is_left_to_it_while_it_is_ready_and_completed_once_it_is_not(tiny_model):
    store = await deployed(tiny_model, nodes=("a", "b"))
    await create_model_info(store, local_model_info(str(tiny_model), None, node_name="b", digests=False))
    spy = Spy()
    publisher = ModelInfoPublisher(store=store, node_name="a", local_info=spy)
    await publisher.reconcile()
    assert spy.asked == []
    await store.submit(make_command("status", ("Node", "", "b"), body={"status": node_body("b", ready="False")["status"]}))
    await publisher.reconcile()
    full = await eventually(lambda: (r := record(store, str(tiny_model))) and has_digests(r) and r, what="the digests")
    assert full.origin == "node/a" and spy.asked == [True]


async def test_a_copy_with_other_files_never_rewrites_the_record(tiny_model, tmp_path):
    store = await deployed(tiny_model)
    await create_model_info(store, local_model_info(str(tiny_model), None, node_name="gone", digests=False))
    other = write_model(tmp_path / "other", TWO_LAYER_LLAMA)
    spy = Spy(lambda source, revision, *, node_name, digests: info_from_directory(
        other, source=source, revision=revision, origin=f"node/{node_name}", digests=digests))
    await ModelInfoPublisher(store=store, node_name="a", local_info=spy).reconcile()
    await eventually(lambda: spy.asked == [True], what="the node to read its copy")
    for _ in range(5):
        await asyncio.sleep(0.01)
    kept = record(store, str(tiny_model))
    assert kept.origin == "node/gone" and not has_digests(kept)


# --- the scheduler plans from the record -------------------------------------------------------

async def test_a_new_leader_without_the_model_plans_the_same_shards_from_the_record(tiny_model):
    first = await deployed(tiny_model, nodes=("a", "b", "c"))
    await SchedulerController(store=first, node_name="a").reconcile()
    second = await deployed(tiny_model, nodes=("a", "b", "c"))
    [info] = first.list(MODEL_INFO_KIND)[0]
    await second.submit(make_command("create", (MODEL_INFO_KIND, "", info["metadata"]["name"]),
                                     body={k: info[k] for k in ("apiVersion", "kind", "spec")} | {
                                         "metadata": {"name": info["metadata"]["name"]}}))
    await SchedulerController(store=second, node_name="b", local_info=no_copy, hub_ready=lambda: False).reconcile()
    assert shards_of(second) == shards_of(first) and len(shards_of(first)) == 3


async def test_with_no_copy_and_no_hub_the_condition_says_so_and_clears_when_a_node_publishes(tiny_model):
    store = await deployed(ELSEWHERE)
    scheduler = SchedulerController(store=store, node_name="a", local_info=no_copy, hub_ready=lambda: False)
    await scheduler.reconcile()
    ready = condition(store, "Ready")
    assert ready["reason"] == "ModelNotFound"
    assert ready["message"].startswith(f"no node has {ELSEWHERE} on disk and the Hugging Face hub is not reachable")
    assert store.list("Shard")[0] == []
    await create_model_info(store, info_from_directory(tiny_model, source=ELSEWHERE, revision=None, origin="node/b"))
    await scheduler.reconcile()
    assert condition(store, "Ready")["reason"] == "ShardsLoading" and store.list("Shard")[0]


async def test_the_hub_is_read_off_the_pass_and_its_record_planned_from(tiny_model):
    store = await deployed(ELSEWHERE)
    asked = []

    def hub_info(repo, *, revision):
        asked.append((repo, revision))
        return info_from_directory(tiny_model, source=ELSEWHERE, revision=revision, origin="hub", digests=False)

    scheduler = SchedulerController(store=store, node_name="a", local_info=no_copy, hub_info=hub_info,
                                    hub_ready=lambda: True)
    await scheduler.reconcile()
    if not store.list("Shard")[0]:  # the read had not finished within the pass
        assert condition(store, "Ready")["reason"] == "ResolvingModel"
        assert condition(store, "Stalled")["status"] == "False" and condition(store, "Progressing")["status"] == "True"

    async def placed():
        await scheduler.reconcile()
        return store.list("Shard")[0]

    deadline = asyncio.get_running_loop().time() + 60
    while not await placed():
        assert asyncio.get_running_loop().time() < deadline, "the hub's record was never planned from"
        await asyncio.sleep(0.02)
    assert asked == [("org/tiny", None)] and record(store, ELSEWHERE).origin == "hub"
    assert condition(store, "Ready")["reason"] == "ShardsLoading"


@pytest.mark.parametrize(("error", "reason", "says"), [
    (ModelAccessDenied("model 'hf://org/tiny': private or gated: set HF_TOKEN on the node"), "ModelAccessDenied",
     "set HF_TOKEN on the node"),
    (ModelNotFound("model 'hf://org/tiny': not found on the hub at http://127.0.0.1:1"), "ModelNotFound",
     "not found on the hub"),
    (HubUnreachable("cannot reach the Hugging Face hub at http://127.0.0.1:1"), "HubUnreachable",
     f"no node has {ELSEWHERE} on disk and the Hugging Face hub is not reachable: cannot reach"),
])
async def test_a_hub_refusal_becomes_the_deployments_condition_without_another_store_change(error, reason, says):
    store = await deployed(ELSEWHERE)
    answer = threading.Event()

    def hub_info(repo, *, revision):
        answer.wait(60)
        raise error

    scheduler = SchedulerController(store=store, node_name="a", local_info=no_copy, hub_info=hub_info,
                                    hub_ready=lambda: True)
    scheduler.resync_seconds = 3600  # no slow resync comes to the rescue within the test
    passes = []
    manager = ControllerManager(store=store, controllers=[scheduler], observer=lambda *args: passes.append(args))
    manager.start()
    try:
        await eventually(lambda: (c := condition(store, "Ready")) and c["reason"] == "ResolvingModel",
                         what="the deployment to say the hub is being read")
        await eventually(lambda: len(passes) >= 2, what="the pass woken by that status write")
        answer.set()  # the hub answers after every pass is done: only the scheduler itself can ask for one
        ready = await eventually(lambda: (c := condition(store, "Ready")) and c["reason"] == reason and c,
                                 what=f"the Ready condition to say {reason}")
    finally:
        answer.set()
        await manager.stop()
    assert says in ready["message"] and condition(store, "Stalled")["status"] == "True"


async def test_through_a_loopback_hub_a_private_model_names_the_token_and_a_public_one_is_placed(tiny_model, monkeypatch):
    with FakeHub({"org/tiny": tiny_model, "org/secret": tiny_model}, private={"org/secret"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        store = await deployed(ELSEWHERE)
        await store.submit(make_command("apply", ("ModelDeployment", "default", "secret"),
                                        body=md_body("hf://org/secret", name="secret")))
        manager = ControllerManager(store=store, controllers=[SchedulerController(store=store, node_name="a")])
        manager.start()
        try:
            denied = await eventually(lambda: (c := condition(store, "Ready", name="secret"))
                                      and c["reason"] == "ModelAccessDenied" and c, what="the private model's refusal")
            await eventually(lambda: store.list("Shard")[0], what="the public model's shards")
        finally:
            await manager.stop()
    assert "HF_TOKEN" in denied["message"]
    spec = record(store, ELSEWHERE)
    assert spec.origin == "hub" and spec.commit == hub.commit("org/tiny")
    assert profile_from_info(spec).model_dump(exclude={"name"}) == profile_from_directory(tiny_model).model_dump(
        exclude={"name"})


# --- the collector -----------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def recorded(tiny_model, store):
    """The tiny model's ModelInfo (from headers) in ``store``; its name."""
    spec = info_from_directory(tiny_model, source=str(tiny_model), revision=None, origin="node/a", digests=False)
    await create_model_info(store, spec)
    return model_info_name(str(tiny_model), None)


async def test_a_model_info_nothing_refers_to_is_deleted_after_the_retention_and_not_before(tiny_model):
    store = await deployed(tiny_model)
    name = await recorded(tiny_model, store)
    clock = Clock()
    collector = ModelInfoCollector(store=store, retention=60, clock=clock)
    await collector.reconcile()
    clock.now = 1000
    await collector.reconcile()
    assert store.get((MODEL_INFO_KIND, "", name)) is not None  # deployed: kept however long

    await store.submit(make_command("delete", ("ModelDeployment", "default", "tiny")))
    await collector.reconcile()  # unreferenced from now (1000)
    clock.now = 1059
    await collector.reconcile()
    assert store.get((MODEL_INFO_KIND, "", name)) is not None
    clock.now = 1060
    await collector.reconcile()
    assert store.get((MODEL_INFO_KIND, "", name)) is None


async def test_a_reference_restarts_the_count(tiny_model):
    store = await deployed(tiny_model)
    name = await recorded(tiny_model, store)
    await store.submit(make_command("delete", ("ModelDeployment", "default", "tiny")))
    clock = Clock()
    collector = ModelInfoCollector(store=store, retention=60, clock=clock)
    await collector.reconcile()
    clock.now = 50
    await store.submit(make_command("apply", ("ModelDeployment", "default", "again"),
                                    body=md_body(tiny_model, name="again")))
    await collector.reconcile()
    await store.submit(make_command("delete", ("ModelDeployment", "default", "again")))
    clock.now = 100
    await collector.reconcile()
    clock.now = 159
    await collector.reconcile()
    assert store.get((MODEL_INFO_KIND, "", name)) is not None  # 59 s unreferenced since the last one
    clock.now = 160
    await collector.reconcile()
    assert store.get((MODEL_INFO_KIND, "", name)) is None


async def test_a_shard_or_a_node_s_copy_keeps_the_record(tiny_model):
    store = await deployed(tiny_model)
    name = await recorded(tiny_model, store)
    await store.submit(make_command("delete", ("ModelDeployment", "default", "tiny")))
    shard = {"apiVersion": "exo.dev/v1alpha1", "kind": "Shard", "metadata": {"name": "tiny-r0-s0"},
             "spec": {"model": {"source": str(tiny_model)}, "nodeName": "a"}}  # still draining
    await store.submit(make_command("create", ("Shard", "", "tiny-r0-s0"), body=shard))
    node = store.get(("Node", "", "a"))
    cached = {"name": name, "source": "hf://org/tiny", "bytes": 1, "complete": False, "parts": ["0-1"]}
    await store.submit(make_command("status", ("Node", "", "a"),
                                    body={**node, "status": {**node["status"], "cachedModels": [cached]}}))
    clock = Clock()
    collector = ModelInfoCollector(store=store, retention=60, clock=clock)
    for step in range(3):
        await collector.reconcile()
        clock.now += 100
    assert store.get((MODEL_INFO_KIND, "", name)) is not None
    await store.submit(make_command("delete", ("Shard", "", "tiny-r0-s0")))
    for step in range(3):
        await collector.reconcile()
        clock.now += 100
    assert store.get((MODEL_INFO_KIND, "", name)) is not None  # the node's cache still holds parts of it
    node = store.get(("Node", "", "a"))
    await store.submit(make_command("status", ("Node", "", "a"),
                                    body={**node, "status": {**node["status"], "cachedModels": []}}))
    for step in range(3):
        await collector.reconcile()
        clock.now += 100
    assert store.get((MODEL_INFO_KIND, "", name)) is None


async def test_a_record_rewritten_while_it_was_judged_is_not_deleted_on_that_pass(tiny_model):
    store = MemoryStore()
    name = await recorded(tiny_model, store)
    clock = Clock()
    collector = ModelInfoCollector(store=store, retention=60, clock=clock)
    await collector.reconcile()
    clock.now = 100
    stale = store.get((MODEL_INFO_KIND, "", name))
    real_list = store.list

    def listing(kind, *args, **kwargs):  # the pass judges the record as it was before the rewrite
        return ([stale], 0) if kind == MODEL_INFO_KIND else real_list(kind, *args, **kwargs)

    await store.submit(make_command("apply", (MODEL_INFO_KIND, "", name),
                                    body={**stale, "metadata": {"name": name, "labels": {"touched": "yes"}}}))
    store.list = listing
    await collector.reconcile()  # its delete carries the old resourceVersion: a 409, no harm
    store.list = real_list
    assert store.get((MODEL_INFO_KIND, "", name)) is not None
    await collector.reconcile()
    assert store.get((MODEL_INFO_KIND, "", name)) is None


async def test_the_scheduler_forgets_the_profile_of_a_collected_record(tiny_model):
    store = await deployed(tiny_model)
    scheduler = SchedulerController(store=store, node_name="a")
    await scheduler.reconcile()
    assert store.list("Shard")[0] and scheduler._profiles  # planned from the record it wrote
    await store.submit(make_command("delete", ("ModelDeployment", "default", "tiny")))
    await scheduler.reconcile()
    clock = Clock()
    collector = ModelInfoCollector(store=store, retention=60, clock=clock)
    await collector.reconcile()
    clock.now = 60
    await collector.reconcile()
    await scheduler.reconcile()
    assert store.list(MODEL_INFO_KIND)[0] == [] and scheduler._profiles == {}
