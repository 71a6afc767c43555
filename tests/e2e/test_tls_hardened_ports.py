"""Non-members that connect to a real node's Raft or data port and send garbage are dropped: random
bytes, a length prefix announcing 2 GB, a pickle that would run code if unpickled (plain, and
encrypted under a wrong password) and wrong HELLOs. The node does not grow, nothing runs, and
the cluster keeps its members and commits writes."""
import os
import pickle
import socket
import struct
import zlib
from pathlib import Path

from pysyncobj.encryptor import getEncryptor

from reconciler.datapath.wire import Frame, Kind, encode_frame, hello_frame

MD = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # what unpickling it would do


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def send(port: int, payload: bytes) -> None:
    """Write ``payload`` (as much as the node takes before dropping us), then close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.settimeout(3)
            sock.recv(1)  # the node hangs up (or the wait times out)
        except OSError:
            pass


def flood(port: int, mib: int = 16) -> socket.socket:
    """A connection that announces a 2 GB message and sends ``mib`` MiB of it (as far as the node reads)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(2)
    try:
        sock.sendall(struct.pack("i", 0x7FFFFFFF) + os.urandom(mib << 20))
    except OSError:
        pass  # dropped, or the node stopped reading
    return sock


def garbage(marker: Path, token: str) -> list[bytes]:
    evil = zlib.compress(pickle.dumps(Evil(marker)), 3)
    wrong_key = getEncryptor(token).encrypt(evil)
    head, _ = encode_frame(Frame(Kind.OPEN, 1, meta={"shard": "x"}))
    hello, _ = encode_frame(hello_frame(token))
    return [
        os.urandom(1 << 20),
        struct.pack("i", 0x7FFFFFFF) + os.urandom(8 << 20),  # "a 2 GB message follows"
        struct.pack("i", len(evil)) + evil,
        struct.pack("i", len(wrong_key)) + wrong_key,
        head, hello + head, evil,
    ]


def test_garbage_on_the_raft_and_data_ports_is_dropped_and_the_cluster_carries_on(exo_cluster, tmp_path):
    cluster = exo_cluster(3)
    target = cluster.nodes[0]
    marker = tmp_path / "unpickled-by-a-node"
    before = rss_mib(target.proc.pid)
    sniffed_api_token = target.secret  # the worst a client holds: the API's root credential itself
    for _ in range(3):
        for payload in garbage(marker, sniffed_api_token):
            send(target.api_port + 1, payload)  # Raft
            send(target.api_port + 2, payload)  # data path
    held = [flood(port) for port in (target.api_port + 1, target.api_port + 2) for _ in range(4)]
    grown = rss_mib(target.proc.pid) - before  # while the flooding connections are still open
    for sock in held:
        sock.close()
    assert not marker.exists(), "a node unpickled what a non-member sent"
    assert grown < 30, f"the node grew by {grown:.0f} MiB from garbage"

    for index, node in enumerate(cluster.nodes):
        status, _, body = node.request("PATCH", f"{MD}/after-garbage-{index}", content_type="application/apply-patch+yaml",
                                       body="apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n"
                                            f"  name: after-garbage-{index}\nspec:\n  model:\n    source: hf://org/m\n"
                                            "  replicas: 0\n")
        assert status == 201, body
    status, _, members = target.request("GET", "/internal/v1/members")
    assert status == 200 and len(members["members"]) == 3, members
    status, _, listing = cluster.nodes[2].request("GET", MD)
    assert {f"after-garbage-{i}" for i in range(3)} <= {i["metadata"]["name"] for i in listing["items"]}
