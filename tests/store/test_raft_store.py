"""The Raft-backed store with three PySyncObj peers in one process (each in its own thread)."""
import asyncio
import socket
import time
from pathlib import Path

import pytest

from reconciler.store.base import StoreError, StoreUnavailable, make_command
from reconciler.store.raft import DUMP_FILE, RaftSettings, RaftStore, load_members

SECRET = "test-secret"
KEY = ("ModelDeployment", "default", "llama")
BODY = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llama", "namespace": "default"}, "spec": {"model": {"source": "/m"}}}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def settings_for(tmp_path: Path, addresses: list[str], index: int, *, secret: str = SECRET) -> RaftSettings:
    return RaftSettings(self_address=addresses[index], partners=tuple(addresses),
                        data_dir=tmp_path / f"node{index}", secret=secret, bind_host="127.0.0.1")


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def cluster(tmp_path):
    addresses = [f"127.0.0.1:{p}" for p in free_ports(3)]
    stores = [RaftStore(settings_for(tmp_path, addresses, i)) for i in range(3)]
    await wait_for(lambda: all(s.has_quorum for s in stores), what="a leader with quorum")
    yield stores
    for store in stores:
        await store.close()


def follower_of(stores):
    return next(s for s in stores if not s.is_leader)


async def test_write_through_a_follower_reaches_every_replica(cluster):
    result = await follower_of(cluster).submit(make_command("apply", KEY, body=BODY))
    assert result["action"] == "created"
    await wait_for(lambda: all(s.revision == result["revision"] for s in cluster), what="replication")
    assert {s.get(KEY)["metadata"]["uid"] for s in cluster} == {result["object"]["metadata"]["uid"]}


async def test_submitter_sees_its_own_write_as_soon_as_the_call_returns(cluster):
    store = follower_of(cluster)
    result = await store.submit(make_command("create", KEY, body=BODY))
    assert store.get(KEY)["metadata"]["resourceVersion"] == str(result["revision"])


async def test_stale_resource_version_is_a_conflict_through_raft(cluster):
    leader, follower = next(s for s in cluster if s.is_leader), follower_of(cluster)
    created = await leader.submit(make_command("create", KEY, body=BODY))
    stale = created["object"]["metadata"]["resourceVersion"]
    await leader.submit(make_command("replace", KEY, body={**BODY, "spec": {"replicas": 2}}))
    with pytest.raises(StoreError) as err:
        await follower.submit(make_command("replace", KEY, body=BODY, expected_rv=stale))
    assert err.value.code == 409


async def test_retried_op_id_applies_once(cluster):
    command = make_command("create", KEY, body=BODY, op_id="op-1")
    first = await cluster[0].submit(command)
    again = await cluster[1].submit(command)
    assert again["revision"] == first["revision"]
    await wait_for(lambda: all(s.revision == first["revision"] for s in cluster), what="replication")
    assert cluster[2].revision == 1


async def test_watch_on_another_node_streams_committed_events(cluster):
    seen = []

    async def consume():
        async for event in cluster[2].watch(0):
            seen.append((event.type, event.revision))
            if len(seen) == 2:
                return

    task = asyncio.create_task(consume())
    await cluster[0].submit(make_command("create", KEY, body=BODY))
    await cluster[1].submit(make_command("delete", KEY))
    await asyncio.wait_for(task, 5)
    assert seen == [("ADDED", 1), ("DELETED", 2)]


async def test_write_without_quorum_fails_fast_as_unavailable(tmp_path):
    addresses = [f"127.0.0.1:{p}" for p in free_ports(3)]
    lonely = RaftStore(settings_for(tmp_path, addresses, 0))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await lonely.submit(make_command("create", KEY, body=BODY), timeout=2)
        assert time.monotonic() - started < 2.5
        assert not lonely.has_quorum
    finally:
        await lonely.close()


async def test_state_and_members_survive_a_restart_from_journal_and_full_dump(tmp_path):
    addresses = [f"127.0.0.1:{p}" for p in free_ports(3)]
    stores = [RaftStore(settings_for(tmp_path, addresses, i)) for i in range(3)]
    await wait_for(lambda: all(s.has_quorum for s in stores), what="quorum")
    for n in range(5):
        await stores[n % 3].submit(make_command("apply", ("ModelDeployment", "default", f"m{n}"),
                                                body={**BODY, "metadata": {"name": f"m{n}"}}))
    await wait_for(lambda: all(s.revision == 5 for s in stores), what="replication")
    stores[0]._sync.forceLogCompaction()
    await wait_for(lambda: (tmp_path / "node0" / DUMP_FILE).exists(), what="full dump")
    await stores[1].submit(make_command("delete", ("ModelDeployment", "default", "m0")))
    await wait_for(lambda: all(s.revision == 6 for s in stores), what="replication")
    before = [dict(s.state.objects) for s in stores]
    for store in stores:
        await store.close()

    assert load_members(tmp_path / "node0") == tuple(sorted(addresses))
    restarted = [RaftStore(settings_for(tmp_path, addresses, i)) for i in range(3)]
    try:
        await wait_for(lambda: all(s.revision == 6 for s in restarted), what="state replayed")
        assert [dict(s.state.objects) for s in restarted] == before
    finally:
        for store in restarted:
            await store.close()


async def test_peer_with_a_wrong_secret_never_receives_state(cluster, tmp_path):
    await cluster[0].submit(make_command("create", KEY, body=BODY))
    intruder_address = f"127.0.0.1:{free_ports(1)[0]}"
    partners = (*cluster[0].members, intruder_address)
    intruder = RaftStore(RaftSettings(self_address=intruder_address, partners=partners,
                                      data_dir=tmp_path / "intruder", secret="wrong",
                                      bind_host="127.0.0.1"), admitted=False)
    try:
        await cluster[0].add_member(intruder_address)   # even if a member lists it...
        await asyncio.sleep(1.5)
        assert intruder.revision == 0 and not intruder.has_quorum
        assert intruder.get(KEY) is None
    finally:
        await intruder.close()
