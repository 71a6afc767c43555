"""Events: recorded by the controllers, counted instead of repeated, bounded in number and age,
and served at /api/v1 with field selectors and as Tables."""
from __future__ import annotations

import asyncio

import pytest

from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers.node_lifecycle import LEASE, NodeLifecycleController
from reconciler.controllers.scheduler import SchedulerController
from reconciler.server.events import EVENT_KIND, expired, write_event
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.server.server_helpers import AUTH, MD_PATH, deployment

GiB = 1024**3
EVENTS = "/api/v1/namespaces/default/events"
MD = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
      "metadata": {"name": "tiny", "namespace": "default", "uid": "u-1"}}


async def settle() -> None:
    """Let the recorder's fire-and-forget tasks finish."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_repeated_event_is_counted_not_duplicated():
    store = MemoryStore()
    for moment in (1000.0, 1010.0):
        await write_event(store, MD, reason="Unschedulable", message="no node fits", type_="Warning",
                          component="scheduler", now=moment)
    await write_event(store, MD, reason="Scheduled", message="shard tiny-0-0 on a", component="scheduler", now=1011.0)
    events, _ = store.list(EVENT_KIND)
    by_reason = {e["reason"]: e for e in events}
    assert set(by_reason) == {"Unschedulable", "Scheduled"}
    unschedulable = by_reason["Unschedulable"]
    assert unschedulable["count"] == 2 and unschedulable["type"] == "Warning"
    assert unschedulable["firstTimestamp"] == "1970-01-01T00:16:40Z"
    assert unschedulable["lastTimestamp"] == "1970-01-01T00:16:50Z"
    assert unschedulable["involvedObject"] == {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
                                               "name": "tiny", "namespace": "default", "uid": "u-1"}


def event(name: str, seen: str) -> dict:
    return {"metadata": {"namespace": "default", "name": name}, "lastTimestamp": seen}


def test_stale_events_and_the_oldest_beyond_the_limit_are_pruned():
    events = [event("old", "1970-01-01T00:00:00Z"), event("a", "1970-01-01T01:00:00Z"),
              event("b", "1970-01-01T01:00:10Z"), event("c", "1970-01-01T01:00:20Z")]
    assert expired(events, now=3700.0, ttl_s=3600.0, limit=2) == [("default", "old"), ("default", "a")]
    assert expired(events, now=3700.0, ttl_s=7200.0, limit=10) == []


async def test_the_recorder_deletes_events_over_the_bound():
    store = MemoryStore()
    for index in range(3):
        await write_event(store, MD, reason="Scheduled", message=f"placement {index}", component="scheduler",
                          now=1000.0 + index)
    await write_event(store, MD, reason="Scheduled", message="placement 3", component="scheduler", now=1003.0,
                      limit=2)
    messages = sorted(e["message"] for e in store.list(EVENT_KIND)[0])
    assert messages == ["placement 2", "placement 3"]


def node_body(name: str) -> dict:
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": name},
            "spec": {"nodeId": name, "address": "127.0.0.1", "apiPort": 1, "raftPort": 2},
            "status": {"allocatable": {"memory": 8 * GiB}, "capacity": {"memory": 8 * GiB},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


async def test_the_scheduler_records_scheduled_and_unschedulable_on_the_deployment(tiny_model):
    store = MemoryStore()
    body = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "tiny", "namespace": "default"},
            "spec": {"model": {"source": str(tiny_model)}, "placement": {"nodeSelector": {"pool": "none"}}}}
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=body))
    await store.submit(make_command("create", ("Node", "", "a"), body=node_body("a")))
    await SchedulerController(store=store).reconcile()
    await settle()
    (unschedulable,) = store.list(EVENT_KIND)[0]
    assert unschedulable["reason"] == "Unschedulable" and unschedulable["type"] == "Warning"
    assert unschedulable["involvedObject"]["name"] == "tiny"
    spec = {**body["spec"], "placement": {}}
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body={**body, "spec": spec}))
    await SchedulerController(store=store).reconcile()
    await settle()
    scheduled = [e for e in store.list(EVENT_KIND)[0] if e["reason"] == "Scheduled"]
    assert len(scheduled) == 1 and "on a (layers 0-" in scheduled[0]["message"]


async def test_events_are_listed_by_involved_object_and_as_a_table(client, store):
    created = await (await client.post(MD_PATH, headers=AUTH, json=deployment("tiny"))).json()
    await write_event(store, created, reason="Scheduled", message="shard tiny-0-0 on a", component="scheduler")
    await write_event(store, {**created, "metadata": {**created["metadata"], "name": "other", "uid": "x"}},
                      reason="Scheduled", message="shard other-0-0 on a", component="scheduler")
    selector = f"involvedObject.name=tiny,involvedObject.kind=ModelDeployment,involvedObject.uid={created['metadata']['uid']}"
    listed = await (await client.get(EVENTS, headers=AUTH, params={"fieldSelector": selector})).json()
    assert listed["kind"] == "EventList" and [e["message"] for e in listed["items"]] == ["shard tiny-0-0 on a"]
    everywhere = await (await client.get("/api/v1/events", headers=AUTH)).json()
    assert len(everywhere["items"]) == 2
    table = await (await client.get(EVENTS, headers={**AUTH, "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})).json()
    assert [c["name"] for c in table["columnDefinitions"]][:5] == ["Last Seen", "Type", "Reason", "Object", "Message"]
    assert table["rows"][0]["cells"][1:4] == ["Normal", "Scheduled", "modeldeployment/other"]
    assert (await client.get(EVENTS, headers=AUTH, params={"fieldSelector": "spec.x=1"})).status == 400
    name = listed["items"][0]["metadata"]["name"]
    assert (await client.get(f"{EVENTS}/{name}", headers=AUTH)).status == 200
    assert (await client.get(f"{EVENTS}/nope", headers=AUTH)).status == 404


async def test_node_lifecycle_records_node_not_ready_when_a_lease_expires():
    store, now = MemoryStore(), [0.0]
    for name in ("a", "b"):
        await store.submit(make_command("create", ("Node", "", name), body={
            "kind": "Node", "metadata": {"name": name}, "spec": {"address": "127.0.0.1", "raftPort": 1}}))
        await store.submit(make_command("create", (LEASE, "", name), body={"kind": LEASE, "metadata": {"name": name}}))
    controller = NodeLifecycleController(store=store, node_name="a", timeout=3, clock=lambda: now[0])
    await controller.reconcile()
    await settle()
    assert store.list(EVENT_KIND)[0] == []  # becoming Ready is no event
    now[0] = 4.0
    await controller.reconcile()
    await settle()
    (event,) = store.list(EVENT_KIND)[0]
    assert event["reason"] == "NodeNotReady" and event["involvedObject"]["name"] == "b"
    assert event["type"] == "Warning" and event["metadata"]["namespace"] == "default"  # as for Kubernetes nodes
