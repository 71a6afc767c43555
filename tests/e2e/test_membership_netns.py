"""Three real ``exo`` nodes on three "hosts": network namespaces on one bridge, each node with its
own address, the default ports and no --peers. They find each other over mDNS and form one
cluster. Everything made here (namespaces, bridge, processes) is gone afterwards. Skips with
the reason where the kernel does not allow network namespaces."""
import json
import sys
import time
from pathlib import Path

import pytest

from harness.membership import MEMBERS, NODES, ready_by_node, unique_secret
from tests.netns import NetnsLab, open_lab, spawn_exo_nodes

pytestmark = pytest.mark.slow

API_PORT = 52415
MDNS_GROUP_HEX = "FB0000E0"  # 224.0.0.251 as /proc/net/igmp writes it

# Run inside a namespace: GET a path of the local node, print {"status", "body"} as JSON.
QUERY = """
import json, ssl, sys, urllib.error, urllib.request
url, token = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # HTTPS from the cluster CA; not what is tested here
try:
    with urllib.request.urlopen(request, timeout=2, context=context) as resp:
        print(json.dumps({"status": resp.status, "body": json.loads(resp.read())}))
except urllib.error.HTTPError as err:
    print(json.dumps({"status": err.code, "body": None}))
except OSError as err:
    print(json.dumps({"status": 0, "body": str(err)}))
"""


def get(lab: NetnsLab, host, path: str, secret: str) -> tuple[int, dict | None]:
    out = lab.run(host, [sys.executable, "-c", QUERY, f"https://{host.address}:{API_PORT}{path}", secret])
    reply = json.loads(out.stdout)
    return reply["status"], reply["body"]


def mdns_devices(igmp: str) -> list[str]:
    """Devices with a 224.0.0.251 membership in a /proc/net/igmp listing."""
    devices, device = set(), None
    for line in igmp.splitlines()[1:]:
        if line[:1].isdigit():
            device = line.split()[1]
        elif line.split()[:1] == [MDNS_GROUP_HEX] and device:
            devices.add(device)
    return sorted(devices)


def test_three_nodes_in_three_network_namespaces_form_one_cluster_without_peers(tmp_path):
    secret = unique_secret()
    logs: dict[str, Path] = {}
    processes = []
    with open_lab(3) as lab:
        try:
            spawned, started_logs = spawn_exo_nodes(lab, data_root=tmp_path, secret=secret)
            processes += spawned
            logs.update(started_logs)
            everyone = sorted(f"{h.address}:{API_PORT + 1}" for h in lab.hosts)
            deadline = time.monotonic() + 60
            pending = list(lab.hosts)
            while pending:
                assert time.monotonic() < deadline, f"no single cluster within 60 s: {pending}"
                assert all(p.poll() is None for p in processes), "a node exited"
                host = pending[0]
                status, document = get(lab, host, MEMBERS, secret)
                _, nodes = get(lab, host, NODES, secret)
                if (status == 200 and sorted(m["raftAddress"] for m in document["members"]) == everyone
                        and nodes and list(ready_by_node(nodes["items"]).values()) == ["True"] * 3):
                    pending.pop(0)
                else:
                    time.sleep(0.3)
            for host in lab.hosts:
                igmp = lab.run(host, ["cat", "/proc/net/igmp"]).stdout
                assert mdns_devices(igmp) == ["eth0"], igmp  # announced only where it serves
        except BaseException:
            for name, path in logs.items():
                print(f"===== {name} =====\n{path.read_text(errors='replace')}")
            raise
    assert all(p.poll() is not None for p in processes)
    assert lab.leftovers() == []
