"""Role tokens on real node processes: roles enforced on every node, revocation and expiry seen by
every node within 2 s, and a sniffed API token opens neither Raft nor the data port."""
from __future__ import annotations

import asyncio
import socket
import time

from harness.cluster import ExoProcess, free_port_block, wait_until
from reconciler.cluster_keys import cluster_keys
from reconciler.datapath.wire import encode_frame, hello_frame
from reconciler.node import data_path_token
from reconciler.store.raft import RaftSettings, RaftStore

MD = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
TOKENS = "/admin/v1/tokens"


def mint(node, role: str, **extra) -> dict:
    status, _, created = node.request("POST", TOKENS, body={"role": role, "description": f"e2e {role}", **extra})
    assert status == 201, created
    return created


def every_node_answers(cluster, path: str, token: str, wanted: int) -> bool:
    return all(node.request("GET", path, token=token, timeout=2.0)[0] == wanted for node in cluster.nodes)


def test_a_revoked_or_expired_token_is_refused_by_every_node_within_two_seconds(exo_cluster):
    cluster = exo_cluster(3)
    view = mint(cluster.nodes[0], "view")
    short = mint(cluster.nodes[0], "view", ttlSeconds=2)
    wait_until(lambda: every_node_answers(cluster, MD, view["token"], 200), timeout=5, what="the token on every node")
    for node in cluster.nodes:   # the role holds on every node
        status, _, body = node.request("DELETE", MD + "/x", token=view["token"])
        assert status == 403 and 'needs role "edit"' in body["message"], body
        assert node.request("GET", "/admin/v1/tokens", token=view["token"])[0] == 403

    status, _, revoked = cluster.nodes[1].request("DELETE", f"{TOKENS}/{view['id']}")
    assert status == 200 and revoked["revoked"] is True
    started = time.monotonic()
    wait_until(lambda: every_node_answers(cluster, MD, view["token"], 401), timeout=2.0,
               what="every node refusing the revoked token")
    print(f"revocation seen by all 3 nodes after {time.monotonic() - started:.3f}s")

    wait_until(lambda: every_node_answers(cluster, MD, short["token"], 401), timeout=2 + 2.0,
               what="every node refusing the expired token")
    status, _, listed = cluster.nodes[2].request("GET", TOKENS)
    states = {t["id"]: t["state"] for t in listed["items"]}
    assert states[view["id"]] == "revoked" and states[short["id"]] == "expired"


def test_a_sniffed_api_token_opens_neither_raft_nor_the_data_port_and_no_credential_reaches_a_log(
        exo_cluster, tmp_path):
    cluster = exo_cluster(3)
    leaked = mint(cluster.nodes[0], "inference")["token"]
    status, _, _ = cluster.nodes[0].request("PATCH", MD + "/x", body="{}", token=leaked)
    assert status == 403

    # Raft: a PySyncObj peer with the token as its password, admitted as a member even, gets no state.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        intruder_address = f"127.0.0.1:{probe.getsockname()[1]}"
    members = tuple(node.raft_address for node in cluster.nodes)

    async def intrude() -> tuple[int, bool]:
        intruder = RaftStore(RaftSettings(self_address=intruder_address, partners=(*members, intruder_address),
                                          data_dir=tmp_path / "intruder", secret=leaked, bind_host="127.0.0.1"),
                             admitted=False)
        try:
            status, _, body = await asyncio.to_thread(
                cluster.nodes[0].request, "POST", "/internal/v1/members",
                body={"raftAddress": intruder_address, "nodeId": "intruder", "apiUrl": "http://127.0.0.1:9"})
            assert status == 200, body
            await asyncio.sleep(2.0)
            return intruder.revision, intruder.has_quorum
        finally:
            await intruder.close()

    (tmp_path / "intruder").mkdir()
    revision, quorum = asyncio.run(intrude())
    assert revision == 0 and not quorum
    assert all(node.ready() for node in cluster.nodes)

    # The data port: a HELLO carrying the token is dropped; the derived data-path key is not.
    async def hello(token: str) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", cluster.nodes[1].api_port + 2)
        head, data = encode_frame(hello_frame(token))
        writer.write(head + bytes(data))
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(1), 3.0) == b""
        except asyncio.TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            writer.close()

    assert asyncio.run(hello(leaked)) is True
    assert asyncio.run(hello(data_path_token(cluster.secret))) is False

    # No credential in a log line, /metrics or the token list, after good, bogus and revoked ones.
    node = cluster.nodes[0]
    created = mint(node, "view")
    bogus = "exo_" + created["id"] + "_not-the-real-one"
    for presented in (created["token"], bogus, cluster.secret + "x"):
        node.request("GET", MD, token=presented)
        node.request("GET", "/v1/models", token=presented)
    node.request("DELETE", f"{TOKENS}/{created['id']}")
    node.request("GET", MD, token=created["token"])
    status, _, metrics = cluster.nodes[1].request("GET", "/metrics")
    assert status == 200
    logs = "\n".join(line for line in cluster.logs().splitlines()
                     if not line.startswith("--- start:"))   # the harness's own record of the command line
    text = logs + str(metrics) + str(cluster.nodes[2].request("GET", TOKENS)[2])
    keys = cluster_keys(cluster.secret)
    for value in (cluster.secret, leaked, created["token"], bogus, keys.raft_password, keys.data_path, keys.member):
        assert value not in text, f"a credential ({value[:6]}...) leaked into a log, /metrics or the token list"


def test_a_new_clusters_first_node_writes_an_admin_and_an_inference_token_for_its_clients(tmp_path):
    node = ExoProcess(index=0, name="node0", data_dir=tmp_path / "node0", api_port=free_port_block(set()),
                      secret=None)
    node.start()
    try:
        node.wait_ready()
        files = {role: node.data_dir / f"{role}-token" for role in ("admin", "inference")}
        wait_until(lambda: all(f.exists() for f in files.values()), timeout=10, what="the first tokens")
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in files.values())
        admin, inference = (files[r].read_text().strip() for r in ("admin", "inference"))
        secret = (node.data_dir / "cluster-secret").read_text().strip()
        assert secret not in admin + inference
        status, _, listed = node.request("GET", TOKENS, token=admin)
        assert status == 200 and sorted(t["role"] for t in listed["items"]) == ["admin", "inference"]
        assert node.request("GET", "/v1/models", token=inference)[0] == 200
        assert node.request("GET", MD, token=inference)[0] == 403
    finally:
        node.kill()
