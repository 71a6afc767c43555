"""Watch streams over HTTP: kubectl semantics, resumption, 410 Gone, selectors, disconnects."""
import asyncio
import json

import aiohttp
import pytest

from reconciler.server.keys import WATCHES
from reconciler.store import state as store_state
from reconciler.store.base import make_command

from tests.server.server_helpers import AUTH, MD_PATH, deployment, node

ALL_MDS = "/apis/exo.dev/v1alpha1/modeldeployments"


async def create(store, name, *, namespace="default", labels=None):
    body = deployment(name, labels=labels, namespace=namespace)
    await store.submit(make_command("create", ("ModelDeployment", namespace, name), body=body))


async def relabel(store, name, labels):
    live = store.get(("ModelDeployment", "default", name))
    body = {**live, "metadata": {**live["metadata"], "labels": labels}}
    await store.submit(make_command("replace", ("ModelDeployment", "default", name), body=body))


async def next_event(response) -> tuple[str, str]:
    line = await asyncio.wait_for(response.content.readline(), 2)
    assert line.endswith(b"\n")
    event = json.loads(line)
    return event["type"], event["object"]["metadata"].get("name", event["object"].get("code"))


async def test_watch_without_version_sends_current_objects_then_changes(client, store):
    await create(store, "a")
    await create(store, "b")
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1"})
    assert response.status == 200
    assert [await next_event(response), await next_event(response)] == [("ADDED", "a"), ("ADDED", "b")]
    await store.submit(make_command("status", ("ModelDeployment", "default", "a"), body={"status": {"readyReplicas": 1}}))
    await store.submit(make_command("delete", ("ModelDeployment", "default", "b")))
    await create(store, "c")
    assert [await next_event(response) for _ in range(3)] == [("MODIFIED", "a"), ("DELETED", "b"), ("ADDED", "c")]
    response.close()


async def test_watch_from_a_resource_version_sends_every_later_event_in_order(client, store):
    await create(store, "a")
    await create(store, "b")
    await store.submit(make_command("delete", ("ModelDeployment", "default", "a")))
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "true", "resourceVersion": "1"})
    assert [await next_event(response), await next_event(response)] == [("ADDED", "b"), ("DELETED", "a")]
    response.close()


async def test_watch_with_timeout_ends_the_stream(client, store):
    await create(store, "a")
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1", "timeoutSeconds": "0"})
    lines = (await asyncio.wait_for(response.read(), 2)).splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["ADDED"]


async def test_watch_filters_by_namespace_and_kind(client, store):
    await create(store, "mine")
    await create(store, "theirs", namespace="team")
    await store.submit(make_command("create", ("Node", "", "node-a"), body=node()))
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1"})
    assert await next_event(response) == ("ADDED", "mine")
    await create(store, "theirs-2", namespace="team")
    await create(store, "mine-2")
    assert await next_event(response) == ("ADDED", "mine-2")
    response.close()

    everywhere = await client.get(ALL_MDS, headers=AUTH, params={"watch": "1", "resourceVersion": "3"})
    assert [await next_event(everywhere), await next_event(everywhere)] == [("ADDED", "theirs-2"), ("ADDED", "mine-2")]
    everywhere.close()


async def test_watch_with_selector_turns_label_changes_into_added_and_deleted(client, store):
    await create(store, "a", labels={"tier": "gpu"})
    await create(store, "b", labels={"tier": "cpu"})
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1", "labelSelector": "tier=gpu"})
    assert await next_event(response) == ("ADDED", "a")
    await relabel(store, "b", {"tier": "gpu"})
    await relabel(store, "a", {"tier": "cpu"})
    await relabel(store, "a", {"tier": "cpu", "x": "y"})  # still not matching: not sent
    await store.submit(make_command("delete", ("ModelDeployment", "default", "b")))
    assert [await next_event(response) for _ in range(3)] == [("ADDED", "b"), ("DELETED", "a"), ("DELETED", "b")]
    response.close()


async def test_resumed_watch_with_selector_knows_what_matched_at_its_version(client, store):
    await create(store, "a", labels={"tier": "gpu"})   # rv 1
    await relabel(store, "a", {"tier": "cpu"})          # rv 2: leaves the selection
    await relabel(store, "a", {"tier": "gpu"})          # rv 3: comes back
    response = await client.get(MD_PATH, headers=AUTH,
                                params={"watch": "1", "labelSelector": "tier=gpu", "resourceVersion": "1"})
    assert [await next_event(response), await next_event(response)] == [("DELETED", "a"), ("ADDED", "a")]
    response.close()


async def test_watch_from_compacted_version_is_410_gone(client, store, monkeypatch):
    monkeypatch.setattr(store_state, "HISTORY_LIMIT", 2)
    for name in "abcd":
        await create(store, name)
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1", "resourceVersion": "1"})
    assert response.status == 410
    body = await response.json()
    assert body["kind"] == "Status" and body["reason"] == "Gone"


async def test_watcher_that_falls_behind_compaction_gets_a_final_410_error_event(client, store, monkeypatch):
    monkeypatch.setattr(store_state, "HISTORY_LIMIT", 2)
    await create(store, "a")
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1"})
    assert await next_event(response) == ("ADDED", "a")
    for name in "bcde":  # committed without yielding: the watcher cannot keep up
        await create(store, name)
    rest = (await asyncio.wait_for(response.read(), 2)).splitlines()
    last = json.loads(rest[-1])
    assert last["type"] == "ERROR" and last["object"]["code"] == 410


async def test_watch_ends_when_its_client_disconnects(client, store):
    watches = client.server.app[WATCHES]
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1"})
    await asyncio.sleep(0.05)
    assert watches.open_count == 1
    response.close()
    for _ in range(100):
        if watches.open_count == 0:
            break
        await asyncio.sleep(0.02)
    assert watches.open_count == 0


async def test_shutdown_ends_open_watches_promptly(client, store):
    # A client that stays connected: only the server's shutdown can end its stream.
    async with aiohttp.ClientSession() as session:
        response = await session.get(client.make_url(MD_PATH), headers=AUTH, params={"watch": "1"})
        assert response.status == 200
        await asyncio.wait_for(client.server.close(), 3)
        assert await asyncio.wait_for(response.read(), 1) == b""


@pytest.mark.parametrize("params", [{"watch": "1", "timeoutSeconds": "-1"}, {"watch": "1", "labelSelector": "a in"}])
async def test_bad_watch_parameters_are_400(client, params):
    response = await client.get(MD_PATH, headers=AUTH, params=params)
    assert response.status == 400
