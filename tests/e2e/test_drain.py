"""Node maintenance on three real ``exo`` nodes: the tiny model is spread over all three, and while
clients stream completions back to back, ``exoctl drain`` moves the shards off one node make
before break. No request fails, the node ends with no shard, it is stopped while the streams go
on, and ``exoctl uncordon`` makes it schedulable again."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.cluster import start_cluster
from harness.serving import API, apply, shards_of, wait_nodes_ready, wait_serving
from tests.cli.cli_helpers import COMMAND
from tests.e2e.test_make_before_break import Streams

pytestmark = pytest.mark.slow


def exoctl(node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXOCTL_")}
    env.update(EXOCTL_SERVER=node.api_url, EXOCTL_TOKEN=node.secret or "")
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_draining_a_node_under_streaming_load_fails_no_request_and_leaves_it_empty(tmp_path: Path) -> None:
    from exo_ctl.model_builder.build_model import build_model

    model = build_model("tiny")
    cluster = start_cluster(3, tmp_path, extra_args=("--memory", "16Gi"))
    try:
        entry, drained = cluster.nodes[0], cluster.nodes[2]
        wait_nodes_ready(cluster, 3)
        apply(entry, "tiny", model)
        old = wait_serving(entry, "tiny", stages=3, timeout=60)
        assert drained.name in {s["spec"]["nodeName"] for s in old}
        clients = [Streams(entry) for _ in range(2)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 30
        while not all(c.tokens >= 10 for c in clients) and not any(c.errors for c in clients):
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.05)
        started = time.monotonic()
        done = exoctl(entry, "drain", drained.name, "--timeout", "120s", timeout=150)
        took = time.monotonic() - started
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{cluster.logs()[-20000:]}"
        assert done.stdout.splitlines()[0] == f"node.exo.dev/{drained.name} cordoned"
        assert done.stdout.splitlines()[-1] == f"node.exo.dev/{drained.name} drained"
        assert drained.name not in {s["spec"]["nodeName"] for s in shards_of(entry, "tiny")}
        new = wait_serving(entry, "tiny", stages=2, timeout=30, avoid=drained.name)
        status, _, node = entry.request("GET", f"{API}/nodes/{drained.name}")
        assert status == 200 and node["spec"]["unschedulable"] is True
        drained.stop()
        stopped = time.monotonic()
        # The streams go on without the stopped node; then one more full stream must finish.
        finished = sum(len(c.done) for c in clients)
        deadline = time.monotonic() + 90
        while sum(len(c.done) for c in clients) < finished + 2 and not any(c.errors for c in clients):
            assert time.monotonic() < deadline, "no stream finished after the drained node stopped"
            time.sleep(0.1)
        for client in clients:
            client.stop(keep_before=stopped)  # a stream begun after the node stopped is not awaited
        for client in clients:
            client.join(120)
        errors = [e for c in clients for e in c.errors]
        assert not errors, f"{errors}\n{done.stdout}\n{cluster.logs()[-30000:]}"
        assert all(tokens > 0 and reason in ("length", "stop") for c in clients for _, _, tokens, reason in c.done)
        assert sorted(s["spec"]["nodeName"] for s in new) == sorted(n.name for n in cluster.nodes[:2])
        back = exoctl(entry, "uncordon", drained.name)
        assert back.returncode == 0 and back.stdout.strip() == f"node.exo.dev/{drained.name} uncordoned", back.stderr
        status, _, node = entry.request("GET", f"{API}/nodes/{drained.name}")
        assert status == 200 and node["spec"]["unschedulable"] is False
        print(f"drain: {took:.1f}s under load, {sum(len(c.done) for c in clients)} streams, 0 errors")
    finally:
        cluster.close()
