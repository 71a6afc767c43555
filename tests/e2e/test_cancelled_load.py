"""A shard load cancelled halfway never stalls the node's event loop: one real ``exo`` node loads
the small model (~3 s here, mlx-lm's import included), the deployment is deleted as soon as the
shard is Loading, and
throughout ``/healthz`` answers fast and the node keeps renewing its lease (its Lease age, as the
node-lifecycle controller on this leader sees it, in ``/metrics``)."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from harness.cluster import ExoProcess, http_json, start_cluster
from harness.serving import DEPLOYMENTS, apply, shards_of

pytestmark = pytest.mark.slow

HEALTHZ_BOUND_S = 0.5     # a loop that is never blocked answers in milliseconds
LEASE_AGE_BOUND_S = 1.6   # renewals every 1 s, plus slack for a loaded 2-core machine
LEASE_AGE = re.compile(r'^exo_node_lease_age_seconds\{node="([^"]+)"\} (\S+)$', re.M)


class Probe(threading.Thread):
    """Polls /healthz and the lease age until stopped; keeps the worst of each."""

    def __init__(self, node: ExoProcess) -> None:
        super().__init__(daemon=True)
        self.node, self.stopped = node, threading.Event()
        self.worst_healthz = 0.0
        self.worst_lease_age = 0.0

    def run(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            status, _, _ = http_json("GET", self.node.api_url + "/healthz", timeout=10.0)
            self.worst_healthz = max(self.worst_healthz, time.monotonic() - started)
            assert status == 200
            status, _, text = self.node.request("GET", "/metrics", timeout=10.0)
            for name, age in LEASE_AGE.findall(text if isinstance(text, str) else ""):
                if name == self.node.name:
                    self.worst_lease_age = max(self.worst_lease_age, float(age))
            self.stopped.wait(0.05)


def test_deleting_a_deployment_mid_load_keeps_the_loop_responsive_and_the_lease_fresh(tmp_path: Path) -> None:
    from exo_ctl.model_builder.build_model import build_model

    model = build_model("small")
    cluster = start_cluster(1, tmp_path)
    node = cluster.nodes[0]
    try:
        probe = Probe(node)
        probe.start()
        apply(node, "small", model)
        deadline = time.monotonic() + 60
        while not any((s.get("status") or {}).get("phase") == "Loading" for s in shards_of(node, "small")):
            assert time.monotonic() < deadline, f"the shard never reported Loading progress\n{cluster.logs()}"
            time.sleep(0.02)
        status, _, body = node.request("DELETE", f"{DEPLOYMENTS}/small")
        assert status == 200, body
        deadline = time.monotonic() + 30
        while "load cancelled" not in node.log_text():
            assert time.monotonic() < deadline, f"the load was not cancelled\n{cluster.logs()}"
            time.sleep(0.05)
        while shards_of(node, "small"):
            assert time.monotonic() < deadline, f"the shard was not deleted\n{cluster.logs()}"
            time.sleep(0.05)
        time.sleep(1.5)  # a stalled loop shows in the next renewal: watch past it
        probe.stopped.set()
        probe.join(15)
        print(f"cancelled load: worst /healthz {probe.worst_healthz:.3f}s, worst lease age {probe.worst_lease_age:.2f}s")
        assert probe.worst_healthz < HEALTHZ_BOUND_S, (probe.worst_healthz, cluster.logs())
        assert 0 < probe.worst_lease_age < LEASE_AGE_BOUND_S, (probe.worst_lease_age, cluster.logs())
        assert "Ready" not in [(s.get("status") or {}).get("phase") for s in shards_of(node, "small")]
    finally:
        cluster.close()
