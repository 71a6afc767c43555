"""Replica agreement, checked: a replica whose journal was edited on disk (one object differs,
every log index and term the same) is found out by the consistency check, refuses reads with
the reason, and re-syncs from the leader until every node holds the same objects."""
import time

from harness.cluster import wait_until

DEPLOYMENT = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
              "metadata": {"name": "agreed", "namespace": "default", "labels": {"tier": "gold"}},
              "spec": {"model": {"source": "/models/agreed"}}}
PATH = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"


def labels_on(node):
    try:
        status, _, body = node.request("GET", f"{PATH}/agreed", timeout=2.0)
    except OSError:
        return None
    return body["metadata"]["labels"]["tier"] if status == 200 else None


def unready_with_divergence(node):
    try:
        status, _, body = node.request("GET", PATH, timeout=1.0)
    except OSError:
        return None
    return str(body) if status == 503 and ("diverged" in str(body) or "re-syncing" in str(body)) else None


def test_a_replica_edited_on_disk_is_detected_refuses_to_serve_and_resyncs_from_the_leader(exo_cluster):
    cluster = exo_cluster(3)
    status, _, _ = cluster.nodes[0].request("POST", PATH, body=DEPLOYMENT)
    assert status == 201
    victim = next(n for n in cluster.nodes if n is not cluster.leader())
    wait_until(lambda: labels_on(victim) == "gold", timeout=10, what="replication")
    victim.kill()
    journal = victim.data_dir / "raft.journal"
    data = journal.read_bytes()
    assert data.count(b'"tier":"gold"') == 1, "the journal does not hold the write to corrupt"
    journal.write_bytes(data.replace(b"gold", b"lead"))  # same length: every record stays whole
    victim.start()
    restarted = time.monotonic()

    wait_until(lambda: labels_on(victim) == "lead" or unready_with_divergence(victim), timeout=30,
               what="the victim to serve its edited replica or refuse")
    seen = wait_until(lambda: unready_with_divergence(victim), timeout=60, what="the check to find the divergence")
    detected = time.monotonic() - restarted
    wait_until(lambda: victim.ready() and labels_on(victim) == "gold", timeout=60, what="the repair")
    repaired = time.monotonic() - restarted
    print(f"divergence detected {detected:.1f}s after the restart, repaired after {repaired:.1f}s: {seen}")
    objects = [sorted((o["metadata"]["name"], o["metadata"]["resourceVersion"], o["metadata"]["labels"]["tier"])
                      for o in n.request("GET", PATH)[2]["items"]) for n in cluster.nodes]
    assert objects[0] == objects[1] == objects[2]
    assert "exo_replica_resyncs 1.0" in victim.request("GET", "/metrics")[2]
    assert "replica diverged" in victim.log_text()
    condition = wait_until(lambda: replica_condition(cluster.leader(), victim.name), timeout=20,
                           what="the divergence on the victim's Node")
    assert condition["reason"] in ("Diverged", "Resynced") and "revision" in condition["message"], condition


def replica_condition(node, name):
    status, _, body = node.request("GET", f"/apis/exo.dev/v1alpha1/nodes/{name}", timeout=2.0)
    conditions = (body.get("status") or {}).get("conditions", []) if status == 200 else []
    return next((c for c in conditions if c["type"] == "ReplicaConsistent" and c["reason"] != "DigestsMatch"), None)
