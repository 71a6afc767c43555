"""Three real ``exo`` processes on 127.0.0.1: writes through any node, failover after kill -9,
recovery of every object after all nodes are killed, and who may (not) join."""
import subprocess
import time
from collections.abc import Iterator

import pytest

from harness.cluster import Cluster, http_json, running_cluster

pytestmark = pytest.mark.slow

COLLECTION = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
APPLY = "application/apply-patch+yaml"


def manifest(name: str, replicas: int = 1) -> str:
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\n"
            f"spec:\n  model:\n    source: hf://org/{name}\n  replicas: {replicas}\n")


def apply(node, name: str, replicas: int = 1):
    return node.request("PATCH", f"{COLLECTION}/{name}", body=manifest(name, replicas), content_type=APPLY)


def wait_for_object(node, name: str, *, resource_version: str, timeout: float = 5.0) -> dict:
    """The object as ``node`` serves it once its replica has caught up with ``resource_version``
    (controllers may have written its status since, so later versions count too)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = node.request("GET", f"{COLLECTION}/{name}")
        if status == 200 and int(body["metadata"]["resourceVersion"]) >= int(resource_version):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name} never served {name}@{resource_version}: {status} {body}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes for the tests that only write, read and try to join; the tests that kill or
    stop nodes start their own."""
    with running_cluster(3, tmp_path_factory.mktemp("processes")) as cluster:
        yield cluster


def test_apply_through_node_one_is_readable_through_node_three(shared):
    cluster = shared
    status, headers, created = apply(cluster.nodes[0], "llama")
    assert status == 201, created
    assert headers.get("X-Exo-Apply-Result") == "created"
    seen = wait_for_object(cluster.nodes[2], "llama", resource_version=created["metadata"]["resourceVersion"])
    assert seen["spec"]["replicas"] == 1
    assert seen["metadata"]["uid"] == created["metadata"]["uid"]


def test_after_kill_9_of_the_leader_a_survivor_accepts_writes_within_seconds(exo_cluster):
    cluster = exo_cluster(3)
    assert apply(cluster.nodes[0], "before")[0] == 201
    leader = cluster.leader()
    leader.kill()
    survivor = next(n for n in cluster.nodes if n is not leader)
    started = time.monotonic()
    while True:
        status, _, body = apply(survivor, "after")
        if status in (200, 201):
            break
        assert status in (503, 504), body
        assert time.monotonic() - started < 5.0, f"no write accepted after 5 s\n{cluster.logs()}"
        time.sleep(0.05)
    assert time.monotonic() - started < 5.0
    status, _, listing = survivor.request("GET", COLLECTION)
    assert sorted(item["metadata"]["name"] for item in listing["items"]) == ["after", "before"]


def test_every_object_and_resource_version_is_back_after_kill_9_of_all_nodes(exo_cluster):
    cluster = exo_cluster(3)
    for index in range(6):
        assert apply(cluster.nodes[index % 3], f"m{index}", replicas=index + 1)[0] == 201
    assert apply(cluster.nodes[1], "m0", replicas=9)[0] == 200
    assert cluster.nodes[0].request("DELETE", f"{COLLECTION}/m5")[0] == 200
    # Wait until the controllers have written every status and all replicas agree (node leases
    # keep the store's revision moving, so objects are compared, not the list's revision).
    deadline = time.monotonic() + 15
    while True:
        listings = [n.request("GET", COLLECTION)[2] for n in cluster.nodes]
        items = [{i["metadata"]["name"]: i for i in listing["items"]} for listing in listings]
        settled = all((i.get("status") or {}).get("observedGeneration") == i["metadata"]["generation"]
                      for i in items[0].values())
        if settled and items[0] == items[1] == items[2]:
            break
        assert time.monotonic() < deadline, "replicas did not converge"
        time.sleep(0.1)
    before, revision_before = items[0], int(listings[0]["metadata"]["resourceVersion"])
    assert sorted(before) == ["m0", "m1", "m2", "m3", "m4"]

    for node in cluster.nodes:
        node.kill()
    for node in cluster.nodes:
        node.start()
    for node in cluster.nodes:
        node.wait_ready()

    for node in cluster.nodes:
        deadline = time.monotonic() + 15
        while True:
            status, _, listing = node.request("GET", COLLECTION)
            after = {item["metadata"]["name"]: item for item in listing["items"]} if status == 200 else {}
            if after == before:
                break
            assert time.monotonic() < deadline, f"{node.name} did not recover: {listing}"
            time.sleep(0.1)
        assert int(listing["metadata"]["resourceVersion"]) >= revision_before


def test_a_node_with_a_wrong_secret_is_never_admitted(shared):
    cluster = shared
    intruder = cluster.add_node(secret="not-the-secret", start=True, wait=False)
    intruder.proc.wait(30)
    assert intruder.proc.returncode == 1
    assert "refused the cluster secret" in intruder.log_path.read_text()
    status, _, doc = cluster.nodes[0].request("GET", "/internal/v1/members")
    assert status == 200
    assert intruder.raft_address not in [m["raftAddress"] for m in doc["members"]]
    status, _, _ = http_json("POST", cluster.nodes[0].api_url + "/internal/v1/members", token="not-the-secret",
                             body={"raftAddress": intruder.raft_address, "nodeId": "x", "apiUrl": intruder.api_url})
    assert status == 401


def test_a_second_process_on_a_locked_data_dir_refuses_to_start(shared):
    node = shared.nodes[0]
    result = subprocess.run(node.command(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"exo: error: data dir {node.data_dir} is in use by another exo process "
                     "(pass a different --data-dir)"]
    assert node.ready()


def test_sigterm_stops_a_node_cleanly_with_exit_code_0(exo_cluster):
    cluster = exo_cluster(1)
    assert cluster.nodes[0].stop() == 0
