"""Raft snapshots as versioned JSON, and dumps written before (pickled dataclasses) still load."""
import gzip
import shutil
from pathlib import Path

import pytest

from reconciler.store.base import make_command
from reconciler.store.raft import DUMP_FILE, RaftSettings, RaftStore
from reconciler.store.snapshot import state_from_snapshot, state_to_snapshot
from reconciler.store.state import StoreState, apply
from tests.store.test_raft_store import BODY, free_ports, wait_for

# Written by the store before snapshot version 1 (3 applies, 1 delete, 1 member registration).
DUMP_BEFORE_V1 = Path(__file__).with_name("raft-dump-before-v1.bin")


def some_state() -> StoreState:
    state = StoreState()
    for n in range(3):
        body = {**BODY, "metadata": {"name": f"m{n}", "namespace": "default", "labels": {"n": str(n)}}}
        state, _ = apply(state, make_command("apply", ("ModelDeployment", "default", f"m{n}"), body=body))
    state, _ = apply(state, make_command("delete", ("ModelDeployment", "default", "m1")))
    state, _ = apply(state, make_command("apply", ("Lease", "", "a"), body={
        "kind": "Lease", "metadata": {"name": "a"}, "spec": {"renewals": 1}}))
    assert state.lease_history
    return state


def test_a_snapshot_round_trips_objects_history_and_op_results():
    state, directory = some_state(), {"10.0.0.1:52416": {"nodeId": "a", "apiUrl": "http://10.0.0.1:52415"}}
    loaded, loaded_directory = state_from_snapshot(state_to_snapshot(state, directory))
    assert loaded == state and loaded_directory == directory


def test_a_snapshot_in_the_pickled_format_before_version_1_still_loads():
    state = some_state()
    loaded, directory = state_from_snapshot({"state": state, "directory": {"x:1": {"nodeId": "a"}}})
    assert loaded == state and directory == {"x:1": {"nodeId": "a"}}


def test_a_snapshot_from_a_newer_version_is_refused_naming_the_version():
    with pytest.raises(ValueError, match="version 99"):
        state_from_snapshot('{"version": 99}')


async def test_a_node_starts_from_a_dump_file_written_before_version_1(tmp_path):
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    shutil.copy(DUMP_BEFORE_V1, data_dir / DUMP_FILE)
    address = f"127.0.0.1:{free_ports(1)[0]}"
    store = RaftStore(RaftSettings(self_address=address, partners=(), data_dir=data_dir, secret="s",
                                   bind_host="127.0.0.1"))
    try:
        await wait_for(lambda: store.revision == 4, what="the old dump loaded")
        assert sorted(k[2] for k in store.state.objects) == ["m0", "m2"]
        assert [d["nodeId"] for d in store.directory.values()] == ["node-a"]
    finally:
        await store.close()


async def test_log_compaction_writes_json_without_class_paths_in_process(tmp_path):
    address = f"127.0.0.1:{free_ports(1)[0]}"
    settings = RaftSettings(self_address=address, partners=(), data_dir=tmp_path, secret="s", bind_host="127.0.0.1")
    assert settings.conf().useFork is False
    store = RaftStore(settings)
    try:
        await wait_for(lambda: store.has_quorum, what="a single-node leader")
        await store.submit(make_command("apply", ("ModelDeployment", "default", "m"), body=BODY))
        store._sync.forceLogCompaction()
        await wait_for(lambda: (tmp_path / DUMP_FILE).exists(), what="the dump")
    finally:
        await store.close()
    raw = gzip.decompress((tmp_path / DUMP_FILE).read_bytes())
    assert b"StoreState" not in raw and b'"version":1' in raw
    again = RaftStore(settings)
    try:
        await wait_for(lambda: again.revision == 1, what="the JSON dump loaded")
    finally:
        await again.close()
