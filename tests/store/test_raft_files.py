"""A node never starts on a truncated or corrupt journal or dump: the error names the file and
says what to do (upstream PySyncObj would start with an EMPTY state on a bad dump)."""
import gzip

import pytest

from reconciler.store.base import StoreRefused, make_command
from reconciler.store.files import disk_full_reason
from reconciler.store.raft import DUMP_FILE, JOURNAL_FILE, RaftStore
from tests.store.test_raft_store import BODY, KEY, free_ports, settings_for, wait_for


async def written_data_dir(tmp_path, *, dump: bool):
    """One single-node store that committed a write (and compacted to a dump if asked), closed."""
    address = f"127.0.0.1:{free_ports(1)[0]}"
    store = RaftStore(settings_for(tmp_path, [address], 0))
    try:
        await wait_for(lambda: store.has_quorum, what="quorum")
        await store.submit(make_command("create", KEY, body=BODY))
        if dump:
            store._sync.forceLogCompaction()
            await wait_for(lambda: (tmp_path / "node0" / DUMP_FILE).exists(), what="a dump")
    finally:
        await store.close()
    return address, tmp_path / "node0"


async def test_a_truncated_journal_is_refused_naming_the_file_and_what_to_do(tmp_path):
    address, data_dir = await written_data_dir(tmp_path, dump=False)
    journal = data_dir / JOURNAL_FILE
    size = len(journal.read_bytes().rstrip(b"\0"))
    with open(journal, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ValueError, match=rf"{journal}: (truncated|corrupt) Raft journal.*re-syncs the state from its peers"):
        RaftStore(settings_for(tmp_path, [address], 0))


async def test_a_journal_record_overwritten_with_garbage_is_refused(tmp_path):
    address, data_dir = await written_data_dir(tmp_path, dump=False)
    journal = data_dir / JOURNAL_FILE
    data = bytearray(journal.read_bytes())
    at = data.index(b"ModelDeployment")
    data[at - 40:at + 40] = b"\xff" * 80
    journal.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{journal}: corrupt Raft journal"):
        RaftStore(settings_for(tmp_path, [address], 0))


async def test_a_corrupt_dump_is_refused_instead_of_starting_empty(tmp_path):
    address, data_dir = await written_data_dir(tmp_path, dump=True)
    dump = data_dir / DUMP_FILE
    dump.write_bytes(gzip.compress(b"not a pickle at all"))
    with pytest.raises(ValueError, match=rf"{dump}: corrupt Raft snapshot.*move raft.dump"):
        RaftStore(settings_for(tmp_path, [address], 0))


async def test_an_intact_data_dir_still_starts_with_its_state(tmp_path):
    address, _ = await written_data_dir(tmp_path, dump=True)
    store = RaftStore(settings_for(tmp_path, [address], 0))
    try:
        await wait_for(lambda: store.get(KEY) is not None, what="the state from the dump")
    finally:
        await store.close()


async def test_writes_are_refused_with_the_reason_while_the_data_dir_lacks_space(tmp_path, monkeypatch):
    address = f"127.0.0.1:{free_ports(1)[0]}"
    store = RaftStore(settings_for(tmp_path, [address], 0))
    try:
        await wait_for(lambda: store.has_quorum, what="quorum")
        monkeypatch.setattr("reconciler.store.raft.disk_full_reason",
                            lambda data_dir: disk_full_reason(data_dir, min_free=2**62))
        with pytest.raises(StoreRefused, match="is full"):
            await store.submit(make_command("create", KEY, body=BODY))
        assert store.get(KEY) is None
    finally:
        await store.close()
