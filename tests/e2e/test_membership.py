"""Zero-config membership with real ``exo`` processes on 127.0.0.1: nodes started with no
``--peers`` find each other over mDNS (interfaces restricted to 127.0.0.1) and form one cluster;
a killed node turns NotReady, comes back with its identity, and leaves Raft after the grace
period; other secrets stay out. Every test uses its own secret, so parallel runs never meet."""
import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.discovery.mdns import Announcement, MdnsDiscovery, cluster_id_from_secret
from harness.cluster import Cluster, ExoProcess, start_cluster
from tests.cli.cli_helpers import COMMAND as EXOCTL
from harness.membership import (MEMBERS, NODES, eventually, log_times, ready_by_node,
                                          unique_secret)

pytestmark = pytest.mark.slow

COLLECTION = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"


def members(node: ExoProcess) -> list[str]:
    status, _, doc = node.request("GET", MEMBERS, timeout=2.0)
    assert status == 200, doc
    return sorted(m["raftAddress"] for m in doc["members"])


def node_objects(node: ExoProcess) -> list[dict]:
    status, _, doc = node.request("GET", NODES, timeout=2.0)
    assert status == 200, doc
    return doc["items"]


def all_ready(node: ExoProcess, count: int) -> bool:
    ready = ready_by_node(node_objects(node))
    return len(ready) == count and set(ready.values()) == {"True"}


def all_registered(node: ExoProcess, count: int) -> bool:
    """``count`` Ready Nodes, each with its capacity and version written."""
    objects = node_objects(node)
    return all_ready(node, count) and all(
        "capacity" in (n.get("status") or {}) and (n.get("status") or {}).get("role") for n in objects)


def follower(cluster: Cluster) -> ExoProcess:
    leader = cluster.leader()
    return next(n for n in cluster.nodes if n is not leader and n.running)


@pytest.fixture(scope="module")
def formed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes started at the same moment with no --peers (read-only tests share it)."""
    cluster = start_cluster(3, tmp_path_factory.mktemp("formed"), secret=unique_secret(), discovery=True)
    yield cluster
    cluster.close()
    print(cluster.logs())


def test_three_nodes_without_peers_form_one_raft_group_within_10_s_of_announcing(formed):
    everyone = sorted(n.raft_address for n in formed.nodes)
    assert all("--peers" not in node.command() for node in formed.nodes)
    for node in formed.nodes:
        eventually(lambda: members(node) == everyone and all_ready(node, 3), timeout=10,
                   what=f"{node.name} sees all 3 members and 3 Ready Nodes")
    formed_at = time.time()
    first_announce = min(t for n in formed.nodes for t in log_times(n.log_path, "discovery: announcing"))
    assert formed_at - first_announce <= 10.0, formed.logs()
    bootstrapped = [n.name for n in formed.nodes if log_times(n.log_path, "bootstrapped a new cluster")]
    assert len(bootstrapped) == 1, formed.logs()


def test_every_node_lists_three_ready_nodes_one_of_them_the_leader(formed):
    for node in formed.nodes:
        eventually(lambda: all_ready(node, 3), timeout=10, what=f"{node.name} lists 3 Ready Nodes")
    eventually(lambda: all_registered(formed.nodes[0], 3), timeout=10, what="every Node has a role")
    roles = sorted(n["status"]["role"] for n in node_objects(formed.nodes[0]))
    assert roles == ["follower", "follower", "leader"]
    leader = formed.leader()
    by_name = {n["metadata"]["name"]: n for n in node_objects(formed.nodes[1])}
    assert by_name[leader.name]["status"]["role"] == "leader"
    for node in formed.nodes:
        assert by_name[node.name]["spec"]["nodeId"] == (node.data_dir / "node-id").read_text().strip()


def exoctl(node: ExoProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXOCTL, "--server", node.api_url, "--token", node.secret, *args],
                          capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])


def test_exoctl_get_nodes_shows_status_role_memory_address_age_and_version(formed):
    eventually(lambda: all_registered(formed.nodes[2], 3), timeout=10, what="3 registered Nodes")
    result = exoctl(formed.nodes[2], "get", "nodes")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "STATUS", "ROLE", "MEMORY", "ADDRESS", "AGE", "VERSION"]
    table = {row.split()[0]: row.split() for row in rows}
    assert sorted(table) == ["node0", "node1", "node2"]
    leader = formed.leader()
    for name, cells in table.items():
        assert cells[1] == "Ready"
        assert cells[2] == ("leader" if name == leader.name else "follower")
        available, _, total = cells[3].partition("/")
        assert available and total, cells
        assert cells[4] == "127.0.0.1"
        assert cells[6] not in ("", "<none>")


def test_exoctl_describe_node_shows_its_conditions_and_capacity(formed):
    node = formed.nodes[1]
    eventually(lambda: all_registered(formed.nodes[0], 3), timeout=10, what="3 registered Nodes")
    result = exoctl(formed.nodes[0], "describe", "node", node.name)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"{'Name:':<14}{node.name}" in text.splitlines()
    assert "Capacity:" in text and "Allocatable:" in text
    memory = [line.split(":", 1)[1] for line in text.splitlines() if line.strip().startswith("Memory:")]
    assert len(memory) == 2 and all(m.strip().endswith(" bytes)") and "i (" in m for m in memory), memory
    conditions = text.split("Conditions:", 1)[1].splitlines()
    assert conditions[1].split()[:4] == ["Type", "Status", "Reason", "Message"]
    assert conditions[2].split()[:3] == ["Ready", "True", "LeaseRenewed"]


def test_a_killed_node_turns_not_ready_within_3_s_and_comes_back_ready_with_the_same_node_id(exo_cluster):
    # Lease renewal every ~1 s + a 2 s timeout + a resync every timeout/4 keeps detection under 3 s;
    # with the default --node-timeout 3 it takes 3-4 s (see bench/RESULTS.md).
    cluster = exo_cluster(3, secret=unique_secret(), discovery=True, extra_args=["--node-timeout", "2"])
    leader = cluster.leader()
    eventually(lambda: all_ready(leader, 3), timeout=10, what="3 Ready Nodes")
    victim = follower(cluster)
    node_id = (victim.data_dir / "node-id").read_text().strip()

    victim.kill()
    killed_at = time.monotonic()
    eventually(lambda: ready_by_node(node_objects(leader)).get(victim.name) == "False", timeout=10,
               what=f"{victim.name} NotReady", interval=0.02)
    assert time.monotonic() - killed_at < 3.0
    others = [n for n in cluster.nodes if n is not victim]
    assert all(ready_by_node(node_objects(leader))[n.name] == "True" for n in others)

    victim.start()  # same data dir, same flags: it rejoins with its saved member list
    victim.wait_ready()
    eventually(lambda: all_ready(leader, 3), timeout=10, what=f"{victim.name} Ready again")
    by_name = {n["metadata"]["name"]: n for n in node_objects(leader)}
    assert by_name[victim.name]["spec"]["nodeId"] == node_id
    assert members(leader) == sorted(n.raft_address for n in cluster.nodes)  # not added twice


def test_a_node_silent_past_the_grace_period_leaves_raft_and_the_survivors_keep_quorum(exo_cluster):
    cluster = exo_cluster(3, secret=unique_secret(), discovery=True, extra_args=["--node-grace", "4"])
    leader = cluster.leader()
    eventually(lambda: all_ready(leader, 3), timeout=10, what="3 Ready Nodes")
    victim = follower(cluster)
    survivors = [n for n in cluster.nodes if n is not victim]

    victim.kill()
    expected = sorted(n.raft_address for n in survivors)
    eventually(lambda: members(leader) == expected, timeout=20, what=f"{victim.name} removed from Raft")
    eventually(lambda: sorted(ready_by_node(node_objects(leader))) == sorted(n.name for n in survivors),
               timeout=5, what=f"{victim.name}'s Node deleted")
    for node in survivors:
        assert members(node) == expected
        assert node.ready()
        body = (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: after-{node.name}\n"
                "spec:\n  model:\n    source: hf://org/m\n  replicas: 1\n")
        status, _, created = node.request("PATCH", f"{COLLECTION}/after-{node.name}", body=body,
                                          content_type="application/apply-patch+yaml")
        assert status == 201, created


async def browse(secret: str, *, expect: int, timeout: float = 10.0) -> dict[str, Announcement]:
    """The announcements of a cluster as another host on 127.0.0.1 sees them."""
    watcher = MdnsDiscovery(announcement=Announcement(
        cluster_id=cluster_id_from_secret(secret), node_id=str(uuid.uuid4()), node_name="watcher",
        address="127.0.0.1", api_port=9, raft_port=9, version="test"), interfaces=["127.0.0.1"])
    await watcher.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = watcher.candidates()
            if len(seen) == expect and all(a.formed for a in seen.values()) and \
                    sum(a.leader for a in seen.values()) == 1:
                return seen
            await asyncio.sleep(0.1)
        return watcher.candidates()
    finally:
        await watcher.stop()


def test_a_node_started_later_without_peers_joins_the_announced_cluster(exo_cluster):
    secret = unique_secret()
    cluster = exo_cluster(2, secret=secret, discovery=True)
    seen = asyncio.run(browse(secret, expect=2))
    assert sorted(a.api_port for a in seen.values()) == sorted(n.api_port for n in cluster.nodes)
    assert all(a.formed for a in seen.values())
    leader = cluster.leader()
    assert [a.api_port for a in seen.values() if a.leader] == [leader.api_port]

    late = cluster.add_node(discovery=True)
    assert members(leader) == sorted(n.raft_address for n in cluster.nodes)
    assert log_times(late.log_path, "discovery: joined the cluster via")
    assert not log_times(late.log_path, "bootstrapped a new cluster")


def test_two_clusters_with_different_secrets_on_one_loopback_stay_apart(tmp_path):
    first = Cluster(nodes=[], root=tmp_path / "first", secret=unique_secret())
    second = Cluster(nodes=[], root=tmp_path / "second", secret=unique_secret(), taken_ports=first.taken_ports)
    try:
        for _ in range(2):  # all four start together, each with no --peers
            first.add_node(discovery=True, wait=False)
            second.add_node(discovery=True, wait=False)
        for node in [*first.nodes, *second.nodes]:
            node.wait_ready()
        for cluster in (first, second):
            own = sorted(n.raft_address for n in cluster.nodes)
            for node in cluster.nodes:
                assert members(node) == own
                eventually(lambda: all_ready(node, 2), timeout=10, what=f"{node.name} lists its 2 Nodes")
    except BaseException:
        print(first.logs(), second.logs())
        raise
    finally:
        first.close()
        second.close()


def test_a_node_with_another_secret_that_tries_peers_is_refused_with_401_and_exits_1(exo_cluster):
    cluster = exo_cluster(1, secret=unique_secret(), discovery=True)
    intruder = cluster.add_node(secret=unique_secret(), peers=[cluster.nodes[0].api_address],
                                discovery=True, wait=False)
    assert intruder.proc.wait(30) == 1
    assert "refused the cluster secret (401)" in intruder.log_path.read_text()
    assert members(cluster.nodes[0]) == [cluster.nodes[0].raft_address]
