"""Lease renewals never push other kinds' events out of the watch history; bookmarks."""
import asyncio
import json

from reconciler.server import watch
from reconciler.store import state as store_state
from reconciler.store.base import make_command
from reconciler.store.state import StoreState

from tests.server.server_helpers import AUTH, MD_PATH, deployment
from tests.server.test_watch_api import create, next_event


def lease_command(renewals):
    return make_command("apply", ("Lease", "", "node-a"), body={
        "apiVersion": "coordination.exo.dev/v1", "kind": "Lease", "metadata": {"name": "node-a"},
        "spec": {"holderIdentity": "a", "renewals": renewals}})


async def renew(store, renewals):
    await store.submit(lease_command(renewals))


async def test_a_watch_resumes_from_before_many_lease_renewals_without_410(client, store, monkeypatch):
    monkeypatch.setattr(store_state, "HISTORY_LIMIT", 2)
    await create(store, "a")                       # rv 1
    await create(store, "b")                       # rv 2
    for renewals in range(6):                      # rv 3..8: more than the limit
        await renew(store, renewals)
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1", "resourceVersion": "1"})
    assert response.status == 200
    assert await next_event(response) == ("ADDED", "b")
    response.close()


async def test_a_quiet_watch_that_allows_bookmarks_gets_the_revision_other_kinds_moved_to(client, store, monkeypatch):
    monkeypatch.setattr(watch, "BOOKMARK_INTERVAL_S", 0.0)
    await create(store, "a")
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1", "allowWatchBookmarks": "true",
                                                                "resourceVersion": "1"})
    for renewals in range(3):
        await renew(store, renewals)
    line = json.loads(await asyncio.wait_for(response.content.readline(), 2))
    while line["object"]["metadata"]["resourceVersion"] != "4":
        line = json.loads(await asyncio.wait_for(response.content.readline(), 2))
    assert line == {"type": "BOOKMARK", "object": {"kind": "ModelDeployment", "apiVersion": "exo.dev/v1alpha1",
                                                   "metadata": {"resourceVersion": "4"}}}
    response.close()


async def test_a_watch_that_did_not_ask_for_bookmarks_gets_none(client, store, monkeypatch):
    monkeypatch.setattr(watch, "BOOKMARK_INTERVAL_S", 0.0)
    response = await client.get(MD_PATH, headers=AUTH, params={"watch": "1"})
    await renew(store, 0)
    await asyncio.sleep(0.2)
    await create(store, "a")
    assert await next_event(response) == ("ADDED", "a")
    response.close()


def test_a_bookmark_never_skips_an_event_of_the_watched_kind_not_yet_delivered():
    state = StoreState()
    for command in (lease_command(0), make_command("create", ("ModelDeployment", "default", "a"),
                                                   body=deployment("a")), lease_command(1)):
        state, _ = store_state.apply(state, command)
    assert watch.bookmark_revision(state, "ModelDeployment", 0) == 1
    assert watch.bookmark_revision(state, "ModelDeployment", 2) == 3
