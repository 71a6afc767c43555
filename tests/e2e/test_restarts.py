"""Restarts and files, through real node processes: a broken journal stops the node with a
message naming the file, a full data dir refuses writes without losing any, and garbage on the
Raft port from a non-member never takes a node down."""
import os
import random
import socket
import subprocess
import time

import pytest

from harness.cluster import HOST, wait_until

PATH = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"


def deployment(name: str) -> dict:
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"}, "spec": {"model": {"source": f"/models/{name}"}}}

def names_on(node) -> set[str]:
    try:
        status, _, body = node.request("GET", PATH, timeout=2.0)
    except OSError:
        return set()
    return {o["metadata"]["name"] for o in body["items"]} if status == 200 else set()


def test_a_node_with_a_truncated_journal_refuses_to_start_and_names_the_file(exo_cluster):
    cluster = exo_cluster(3)
    assert cluster.nodes[0].request("POST", PATH, body=deployment("kept"))[0] == 201
    node = cluster.nodes[2]
    wait_until(lambda: "kept" in names_on(node), timeout=10, what="replication")
    node.kill()
    journal = node.data_dir / "raft.journal"
    end = len(journal.read_bytes().rstrip(b"\0"))
    with open(journal, "r+b") as f:
        f.truncate(end - 7)
    node.start()
    assert node.proc.wait(30) != 0
    log = node.log_text()
    assert f"{journal}: " in log and "re-syncs the state from its peers" in log, log[-2000:]


def test_raw_garbage_on_the_raft_port_from_a_non_member_never_crashes_a_node(exo_cluster):
    cluster = exo_cluster(3)
    target = cluster.nodes[1]
    rng = random.Random(10)
    for size in (1, 7, 64, 4096, 200_000):
        with socket.create_connection((HOST, target.api_port + 1), timeout=5) as conn:
            try:
                conn.sendall(rng.randbytes(size))
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(2)
                conn.recv(1024)
            except OSError:
                pass  # the node may drop the connection: that is the point
    assert target.running, target.log_text()
    assert target.request("POST", PATH, body=deployment("after-garbage"))[0] == 201
    wait_until(lambda: target.ready() and "after-garbage" in names_on(cluster.nodes[2]), timeout=10,
               what="the cluster to keep serving")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs for one node's data dir, unmounted at teardown."""
    mounts = []

    def mount(path):
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path
    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_data_dir_refuses_writes_with_a_clear_error_and_loses_nothing(exo_cluster, small_disk):
    cluster = exo_cluster(2)
    data_dir = small_disk(cluster.root / "node2")
    full = cluster.add_node()
    for n in range(5):
        assert full.request("POST", PATH, body=deployment(f"before{n}"))[0] == 201
    filler = data_dir / "filler"
    free = os.statvfs(data_dir).f_bavail * os.statvfs(data_dir).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * (free - 8 * 2**20))
    status, _, body = full.request("POST", PATH, body=deployment("refused"))
    assert status == 503 and "is full" in body["message"] and str(data_dir) in body["message"], body
    for n in range(5):  # the majority goes on; the full node takes no entries and does not crash
        assert cluster.nodes[0].request("POST", PATH, body=deployment(f"during{n}"))[0] == 201
    time.sleep(1)
    assert full.running and full.request("GET", "/healthz")[0] == 200, full.log_text()
    filler.unlink()
    expected = {f"before{n}" for n in range(5)} | {f"during{n}" for n in range(5)}
    wait_until(lambda: names_on(full) == expected, timeout=20, what="the node to catch up once space is freed")
    assert full.request("POST", PATH, body=deployment("after"))[0] == 201
    full.kill()
    full.start()
    full.wait_ready()
    wait_until(lambda: names_on(full) == expected | {"after"}, timeout=20, what="the state after a restart")


def raft_members(node) -> list[str]:
    try:
        status, _, doc = node.request("GET", "/internal/v1/members", timeout=2.0)
    except OSError:
        return []
    return sorted(m["raftAddress"] for m in doc["members"]) if status == 200 else []


def test_a_node_removed_after_the_grace_period_rejoins_by_itself_with_its_data_dir(exo_cluster):
    cluster = exo_cluster(3, extra_args=["--node-grace", "4"])
    leader = cluster.leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    assert victim.request("POST", PATH, body=deployment("before-removal"))[0] == 201
    victim.kill()
    survivors = sorted(n.raft_address for n in cluster.nodes if n is not victim)
    wait_until(lambda: raft_members(leader) == survivors, timeout=30, what=f"{victim.name} removed from Raft")
    assert leader.request("POST", PATH, body=deployment("while-away"))[0] == 201

    victim.start()  # same data dir: it rejoins with its saved member list, which still names it
    everyone = sorted(n.raft_address for n in cluster.nodes)
    wait_until(lambda: raft_members(leader) == everyone, timeout=40, what=f"{victim.name} admitted again")
    victim.wait_ready(timeout=30)
    wait_until(lambda: {"before-removal", "while-away"} <= names_on(victim), timeout=15, what="its state")
    assert victim.request("POST", PATH, body=deployment("after-rejoin"))[0] == 201
    assert "admitted to the cluster again" in victim.log_text()
