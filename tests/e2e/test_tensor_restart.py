"""Through real ``exo`` processes on 127.0.0.1: a tensor rank's worker process killed while its node
stays up is started again (both ranks), and the deployment is Ready and answers as before; and tensor
ranks the model's family cannot be sharded over are refused when applied (HTTP and exoctl)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cluster import ExoProcess
from harness.serving import APPLY, DEPLOYMENTS, client_for, node_named, shards_of, wait_nodes_ready, wait_serving
from tests.e2e.test_tensor_parallel import MAX_TOKENS, PROMPT, manifest, model_dir, reference  # noqa: F401

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EXOCTL = Path(sys.executable).with_name("exoctl")


def rank_workers(node: ExoProcess) -> list[int]:
    """The tensor-rank worker processes the node has started (its children running tensor_worker)."""
    assert node.proc is not None
    pid, found = node.proc.pid, []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"reconciler.runtime.tensor_worker" in command:
                found.append(int(child))
    return found


def test_a_killed_rank_worker_on_a_live_node_is_restarted_and_the_deployment_serves_again(
        exo_cluster, model_dir, reference):
    cluster = exo_cluster(2)
    wait_nodes_ready(cluster, 2)
    entry = cluster.nodes[0]
    status, _, reply = entry.request("PATCH", f"{DEPLOYMENTS}/tp", body=manifest("tp", model_dir),
                                     content_type=APPLY, timeout=60)
    assert status in (200, 201), reply
    shards = wait_serving(entry, "tp", stages=2, timeout=150.0)
    text = reference.text(reference.greedy(reference.tokenizer.encode(PROMPT), MAX_TOKENS))
    assert client_for(entry).completions.create(model="tp", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                temperature=0).choices[0].text == text

    rank1 = node_named(cluster, next(s for s in shards if s["spec"]["tensor"]["rank"] == 1)["spec"]["nodeName"])
    [worker] = rank_workers(rank1)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        messages = " ".join((s.get("status") or {}).get("message", "") for s in shards_of(entry, "tp"))
        if "restarting it in" in messages:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the killed rank never showed as Failed and about to restart")

    again = wait_serving(entry, "tp", stages=2, timeout=150.0)
    # The same Shards (not re-placed by the scheduler): the agents started their ranks again.
    assert {s["metadata"]["uid"] for s in again} == {s["metadata"]["uid"] for s in shards}
    assert all(node.proc is not None and node.proc.poll() is None for node in cluster.nodes)
    [restarted] = rank_workers(rank1)
    assert restarted != worker
    assert client_for(entry).completions.create(model="tp", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                temperature=0).choices[0].text == text


def test_tensor_ranks_the_family_cannot_be_sharded_over_are_refused_at_apply(exo_cluster, model_dir, tmp_path):
    cluster = exo_cluster(1)
    wait_nodes_ready(cluster, 1)
    node = cluster.nodes[0]
    refused = manifest("tp3", model_dir).replace("tensor: 2", "tensor: 3")  # 2 key-value heads
    status, _, reply = node.request("PATCH", f"{DEPLOYMENTS}/tp3", body=refused, content_type=APPLY, timeout=60)
    assert status == 422 and reply["reason"] == "Invalid", reply
    assert reply["details"]["causes"][0]["field"] == "spec.parallelism.tensor"
    assert "'llama'" in reply["message"] and "num_key_value_heads (2)" in reply["message"]

    file = tmp_path / "tp3.yaml"
    file.write_text(refused)
    env = {**os.environ, "EXOCTL_SERVER": node.api_url, "EXOCTL_TOKEN": node.secret or ""}
    for extra in ([], ["--dry-run=server"]):
        run = subprocess.run([str(EXOCTL), "apply", *extra, "-f", str(file)], capture_output=True, text=True,
                             timeout=60, env=env, cwd=REPO)
        assert run.returncode != 0, run.stdout
        assert "spec.parallelism.tensor" in run.stderr and "'llama'" in run.stderr, run.stderr
    status, _, reply = node.request("GET", f"{DEPLOYMENTS}/tp3")
    assert status == 404, reply
