"""Cordoned nodes (spec.unschedulable): place() gives them no shards, and the scheduler moves the
shards they hold make-before-break, or keeps them there and says why when there is no room."""
import asyncio

import pytest

from exo_ctl.api.meta import ObjectMeta
from exo_ctl.api.resources import ModelDeployment, Node, NodeSpec, Shard
from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers.deployment_status import placement_revision
from reconciler.controllers.node_registration import NodeIdentity, NodeRegistrar
from reconciler.models.metadata import profile_from_directory
from reconciler.scheduler.placement import node_is_schedulable, place
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.controllers.test_make_before_break import names, node as mbb_node, report_ready, routes, serving_on_three
from tests.controllers.test_scheduler import GiB, md_body
from tests.scheduler.test_placement import deployment, layout, node, profile


def cordoned(n: Node) -> Node:
    return n.model_copy(update={"spec": NodeSpec(**{**n.spec.model_dump(), "unschedulable": True})})


@pytest.mark.parametrize(("nodes", "expected"), [
    ([node("a", 4), cordoned(node("b", 4)), node("c", 4)], [("a", 0, 4), ("c", 4, 8)]),
    ([cordoned(node("a", 8)), node("b", 8)], [("b", 0, 8)]),
    ([node("a", 4), cordoned(node("b", 4, ready=False)), node("c", 4)], [("a", 0, 4), ("c", 4, 8)]),
])
def test_a_new_placement_leaves_cordoned_nodes_out(nodes, expected):
    plan = place(deployment=deployment(strategy="Spread"), nodes=nodes, shards=[], profile=profile(8))
    assert plan.schedulable and layout(plan) == expected


def test_a_placement_on_a_node_that_is_then_cordoned_moves_off_it():
    md, model = deployment(strategy="Spread"), profile(9)
    nodes = [node("a", 4), node("b", 4), node("c", 4)]
    first = place(deployment=md, nodes=nodes, shards=[], profile=model)
    shards = [Shard(metadata=ObjectMeta(name=f"s{a.index}"), spec=a.to_spec(md)) for a in first.assignments]
    again = place(deployment=md, nodes=[nodes[0], cordoned(nodes[1]), nodes[2]], shards=shards, profile=model)
    assert "b" in {a.node for a in first.assignments} and "b" not in {a.node for a in again.assignments}


def test_when_every_node_is_cordoned_the_reason_names_them():
    plan = place(deployment=deployment(), nodes=[cordoned(node("a", 8)), cordoned(node("b", 8))], shards=[],
                 profile=profile(4))
    assert not plan.schedulable and "2 cordoned nodes left out: a, b" in (plan.reason or "")


def test_a_cordoned_ready_node_is_not_schedulable():
    assert node_is_schedulable(node("a", 1)) and not node_is_schedulable(cordoned(node("a", 1)))


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


async def cordon(store, name, value=True):
    live = store.get(("Node", "", name))
    await store.submit(make_command("replace", ("Node", "", name), body={**live, "spec": {**live["spec"], "unschedulable": value}}))


async def test_cordoning_a_serving_node_moves_its_shard_make_before_break(tiny_model):
    store, scheduler = await serving_on_three(tiny_model)
    old = names(store)
    await cordon(store, "b")
    await scheduler.reconcile()
    newer = [s for s in store.list("Shard")[0] if placement_revision(s) == 1]
    assert sorted(s["spec"]["nodeName"] for s in newer) == ["a", "c"]
    assert routes(store) == [old]  # the old placement, b included, serves until the new one is Ready
    await report_ready(store, names={s["metadata"]["name"] for s in newer})
    await scheduler.reconcile()
    assert sorted(s["spec"]["nodeName"] for s in store.list("Shard")[0]) == ["a", "c"]
    await cordon(store, "b", False)
    await scheduler.reconcile()
    assert "b" in {s["spec"]["nodeName"] for s in store.list("Shard")[0]}  # uncordoned: schedulable again


async def test_without_room_for_both_the_shards_stay_on_the_cordoned_node_and_an_event_says_why(tiny_model):
    model, md = profile_from_directory(tiny_model), ModelDeployment.model_validate(md_body(tiny_model))
    two = place(deployment=md, nodes=[mbb_node(n, 64 * GiB) for n in "ac"], shards=[], profile=model)
    stage = max(a.memory_bytes + a.kv_cache_bytes + a.overhead_bytes for a in two.assignments)
    # Room for a stage of two, not for one of two beside one of three.
    store, scheduler = await serving_on_three(tiny_model, memory=stage * 11 // 10 + md.spec.resources.headroom_bytes)
    old = names(store)
    await cordon(store, "b")
    await scheduler.reconcile()
    assert names(store) == old and routes(store) == [old]
    for _ in range(50):  # events are written in the background
        await asyncio.sleep(0.01)
    events = [e for e in store.list("Event")[0] if e.get("reason") == "DrainBlocked"]
    assert events and "cordoned node b" in events[0]["message"] and "cannot hold" in events[0]["message"]


async def test_a_node_re_registering_keeps_the_cordon_an_admin_set():
    store = MemoryStore()
    identity = NodeIdentity(name="a", node_id="id-a", address="127.0.0.1", api_port=1, raft_port=2, data_port=3,
                            memory_override=2**30)
    registrar = NodeRegistrar(store=store, identity=identity)
    await registrar.register()
    await cordon(store, "a")
    await registrar.register()
    assert store.get(("Node", "", "a"))["spec"]["unschedulable"] is True


async def test_a_model_that_fits_only_with_the_cordoned_node_keeps_serving_there(tiny_model):
    store, scheduler = await serving_on_three(tiny_model)
    old = names(store)
    for name in ("a", "c"):
        await cordon(store, name)
    await cordon(store, "b")
    await scheduler.reconcile()
    for _ in range(50):  # events are written in the background
        await asyncio.sleep(0.01)
    assert names(store) == old and routes(store) == [old]
    md = store.get(("ModelDeployment", "default", "tiny"))
    assert {c["type"]: c["status"] for c in md["status"]["conditions"]}["Ready"] == "True"
    events = [e for e in store.list("Event")[0] if e.get("reason") == "DrainBlocked"]
    assert events and "3 cordoned nodes left out: a, b, c" in events[-1]["message"]
