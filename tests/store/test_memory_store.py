"""Watch semantics of the store interface, on the in-memory twin."""
import asyncio

import pytest

from reconciler.store import state as st
from reconciler.store.base import Gone, StoreError, StoreUnavailable, make_command
from reconciler.store.memory import MemoryStore

KEY = ("ModelDeployment", "default", "a")
BODY = {"kind": "ModelDeployment", "metadata": {"name": "a"}, "spec": {"model": {"source": "/m"}}}


async def test_watch_streams_events_after_revision_in_order():
    store = MemoryStore()
    await store.submit(make_command("create", KEY, body=BODY))
    seen = []

    async def consume():
        async for event in store.watch(0):
            seen.append((event.type, event.revision))
            if len(seen) == 3:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await store.submit(make_command("status", KEY, body={"status": {"readyReplicas": 1}}))
    await store.submit(make_command("delete", KEY))
    await asyncio.wait_for(task, 2)
    assert seen == [("ADDED", 1), ("MODIFIED", 2), ("DELETED", 3)]


async def test_watch_from_compacted_revision_is_gone(monkeypatch):
    monkeypatch.setattr(st, "HISTORY_LIMIT", 2)
    store = MemoryStore()
    await store.submit(make_command("create", KEY, body=BODY))
    for n in range(3):
        await store.submit(make_command("status", KEY, body={"status": {"readyReplicas": n + 1}}))
    with pytest.raises(Gone):
        async for _ in store.watch(1):
            pass


async def test_failed_write_raises_store_error_with_status():
    store = MemoryStore()
    with pytest.raises(StoreError) as err:
        await store.submit(make_command("delete", KEY))
    assert err.value.code == 404


async def test_write_without_quorum_is_unavailable():
    store = MemoryStore(quorum=False)
    with pytest.raises(StoreUnavailable):
        await store.submit(make_command("create", KEY, body=BODY))


async def test_a_watch_of_one_kind_from_an_old_revision_survives_many_lease_renewals(monkeypatch):
    monkeypatch.setattr(st, "HISTORY_LIMIT", 2)
    store = MemoryStore()
    await store.submit(make_command("create", KEY, body=BODY))
    for n in range(5):
        await store.submit(make_command("apply", ("Lease", "", "n"), body={
            "kind": "Lease", "metadata": {"name": "n"}, "spec": {"renewals": n}}))
    await store.submit(make_command("delete", KEY))
    events = store.watch(0, "ModelDeployment")
    assert [(e.type, e.revision) for e in [await anext(events), await anext(events)]] == [("ADDED", 1), ("DELETED", 7)]
    await events.aclose()
    with pytest.raises(Gone):
        await anext(store.watch(0, "Lease"))
