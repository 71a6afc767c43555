"""Discovery between real separate hosts: one helper process per network namespace, all on one
bridge. Skips where the kernel does not allow network namespaces."""
import json
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

from reconciler.discovery.mdns import cluster_id_from_secret
from tests.netns import NetnsLab, open_lab

PEER = str(Path(__file__).with_name("mdns_peer.py"))


def start_peers(lab: NetnsLab, *, cluster_id: str, expect: int) -> dict[str, subprocess.Popen]:
    peers = {}
    for host in lab.hosts:
        node_id = str(uuid.uuid4())
        peers[node_id] = lab.spawn(host, [
            sys.executable, PEER, "--address", host.address, "--cluster-id", cluster_id,
            "--node-id", node_id, "--name", f"host-{host.index}", "--expect", str(expect),
            "--timeout", "10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return peers


def read_reports(peers: dict[str, subprocess.Popen], *, timeout: float = 20) -> dict[str, dict]:
    reports, deadline = {}, time.monotonic() + timeout
    while len(reports) < len(peers) and time.monotonic() < deadline:
        waiting = {p.stdout: node for node, p in peers.items() if node not in reports}
        ready, _, _ = select.select(list(waiting), [], [], 0.2)
        for stream in ready:
            line = stream.readline()
            if not line:
                process = peers[waiting[stream]]
                raise AssertionError(f"peer exited: {process.wait()} {process.stderr.read()}")
            reports[waiting[stream]] = json.loads(line)
    assert len(reports) == len(peers), f"only {len(reports)} of {len(peers)} peers reported"
    return reports


def test_a_node_in_each_of_three_namespaces_sees_the_other_two():
    cluster_id = cluster_id_from_secret(uuid.uuid4().hex)
    with open_lab(3) as lab:
        decoy = lab.add_decoy(lab.hosts[0], "10.214.0.1/24")
        tx_before = lab.tx_packets(lab.hosts[0], decoy)
        peers = start_peers(lab, cluster_id=cluster_id, expect=2)
        reports = read_reports(peers)
        tx_after = lab.tx_packets(lab.hosts[0], decoy)
        address_of = {node: host.address for node, host in zip(peers, lab.hosts)}
        for node, report in reports.items():
            expected = {other: address for other, address in address_of.items() if other != node}
            assert report["candidates"] == expected, report
            # Joined the mDNS group on the bridge interface only, never on lo or the decoy.
            assert report["mdns_group_devices"] == ["eth0"], report
        assert tx_after == tx_before, "discovery sent packets on an interface it was not given"
        for process in peers.values():
            process.stdin.close()
            assert process.wait(timeout=10) == 0


def test_a_node_killed_and_restarted_with_new_ports_is_seen_with_the_new_ports():
    cluster_id = cluster_id_from_secret(uuid.uuid4().hex)
    with open_lab(2) as lab:
        watcher_host, restarting_host = lab.hosts
        watcher = lab.spawn(watcher_host, [
            sys.executable, "-c", WATCH_SCRIPT, watcher_host.address, cluster_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        node_id = str(uuid.uuid4())

        def start(api_port: int) -> subprocess.Popen:
            return lab.spawn(restarting_host, [
                sys.executable, PEER, "--address", restarting_host.address, "--cluster-id", cluster_id,
                "--node-id", node_id, "--api-port", str(api_port), "--expect", "0"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        first = start(41001)
        assert wait_for_line(watcher, f"{node_id} {restarting_host.address}:41001")
        first.kill()  # no goodbye: mDNS keeps showing the dead node, by design
        first.wait(timeout=5)
        start(41002)
        assert wait_for_line(watcher, f"{node_id} {restarting_host.address}:41002", timeout=5)


WATCH_SCRIPT = """
import asyncio, sys, uuid
from reconciler.discovery.mdns import Announcement, MdnsDiscovery
async def main(address, cluster_id):
    me = Announcement(cluster_id=cluster_id, node_id=str(uuid.uuid4()), node_name="watcher",
                      address=address, api_port=52415, raft_port=52416, version="test")
    discovery = MdnsDiscovery(announcement=me, interfaces=[address])
    events = discovery.subscribe()
    await discovery.start()
    while True:
        event = await events.get()
        print(event.kind, event.announcement.node_id, event.announcement.api_address, flush=True)
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def wait_for_line(process: subprocess.Popen, text: str, *, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"watcher exited: {process.stderr.read()}")
            if text in line:
                return True
    return False
