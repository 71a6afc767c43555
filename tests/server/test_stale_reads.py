"""A node that may hold a stale replica answers 503 to resource reads, writes, watches and /readyz."""
import asyncio
import json

from reconciler.store.base import make_command

from tests.server.server_helpers import AUTH, MD_PATH, deployment


async def test_reads_through_a_node_without_quorum_are_refused_with_503_and_the_reason(client, store):
    await store.submit(make_command("create", ("ModelDeployment", "default", "llama"), body=deployment()))
    assert (await client.get(MD_PATH, headers=AUTH)).status == 200
    store.quorum = False
    for path in (MD_PATH, MD_PATH + "/llama", "/apis"):
        response = await client.get(path, headers=AUTH)
        assert response.status == 503, path
        body = await response.json()
        assert body["kind"] == "Status" and body["code"] == 503 and "no quorum" in body["message"]
        assert response.headers["Retry-After"] == "1"
    ready = await client.get("/readyz")
    assert ready.status == 503 and "no quorum" in await ready.text()


async def test_a_write_through_a_node_without_quorum_is_a_503_status_saying_so(client, store):
    store.quorum = False
    response = await client.post(MD_PATH, headers=AUTH, json=deployment())
    assert response.status == 503
    body = await response.json()
    assert body["kind"] == "Status" and "no quorum" in body["message"] and "X-Exo-Op-Id" in response.headers


async def test_unauthenticated_reads_are_still_401_when_the_node_has_no_quorum(client, store):
    store.quorum = False
    assert (await client.get(MD_PATH)).status == 401


async def test_an_open_watch_ends_with_a_503_error_event_when_the_node_loses_quorum(client, store):
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1"})
    assert response.status == 200
    store.quorum = False
    line = await asyncio.wait_for(response.content.readline(), 2)
    event = json.loads(line)
    assert event["type"] == "ERROR" and event["object"]["code"] == 503 and "no quorum" in event["object"]["message"]
