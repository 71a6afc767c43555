"""Said early, on three real nodes: a model that cannot be split is refused with its reason
before any shard exists (``exoctl wait`` exits at once), a 2-layer model spread over 3 nodes says
which node got nothing and why (status and ``exoctl describe``) and refuses prompts beyond the
context its stages reserved, and ``apply --dry-run=server``
shows each stage's KV cache reservation, or the numbers per node when it does not fit."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import ExoProcess, start_cluster, wait_until
from tests.model_files import MAMBA, TWO_LAYER_LLAMA, write_model

pytestmark = pytest.mark.slow

MDS = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
REPO = Path(__file__).resolve().parents[2]
EXOCTL = Path(sys.executable).with_name("exoctl")


def manifest(name: str, source: Path, **resources: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"source": str(source)}, "placement": {"strategy": "Spread"}}
    if resources:
        spec["resources"] = resources
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def exoctl(node: ExoProcess, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXOCTL_SERVER": node.api_url, "EXOCTL_TOKEN": node.secret or ""}
    return subprocess.run([str(EXOCTL), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def conditions(node: ExoProcess, name: str) -> dict[str, dict[str, Any]]:
    status, _, body = node.request("GET", f"{MDS}/{name}")
    return {c["type"]: c for c in ((body or {}).get("status") or {}).get("conditions", [])} if status == 200 else {}

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    models = {"two": write_model(root / "two", TWO_LAYER_LLAMA, tokenizer=True),
              "mamba": write_model(root / "mamba", MAMBA, tokenizer=True)}
    cluster = start_cluster(3, root / "cluster", extra_args=("--memory", "16Gi"))
    try:
        wait_until(lambda: len(cluster.nodes[0].request("GET", "/apis/exo.dev/v1alpha1/nodes")[2]["items"]) == 3,
                   timeout=30, what="3 nodes", cluster=cluster)
        yield cluster, models, root
    finally:
        cluster.close()


def test_an_unsplittable_family_is_stalled_with_its_reason_and_exoctl_wait_exits_at_once(world):
    cluster, models, root = world
    path = root / "mamba.json"
    path.write_text(json.dumps(manifest("mamba", models["mamba"])))
    assert exoctl(cluster.nodes[0], "apply", "-f", str(path)).returncode == 0
    started = time.monotonic()
    waited = exoctl(cluster.nodes[1], "wait", "md/mamba", "--for=condition=Ready", "--timeout=120s")
    assert waited.returncode != 0 and time.monotonic() - started < 60
    assert "UnsplittableModel" in waited.stderr + waited.stdout and "ArraysCache" in waited.stderr + waited.stdout
    _, _, shards = cluster.nodes[0].request("GET", "/apis/exo.dev/v1alpha1/shards")
    assert [s for s in shards["items"] if s["spec"]["deployment"] == "default/mamba"] == []


def test_a_two_layer_model_spread_over_three_nodes_serves_on_two_and_says_why_the_third_got_nothing(world):
    cluster, models, root = world
    path = root / "two.json"
    path.write_text(json.dumps(manifest("two", models["two"], contextLength=64)))
    assert exoctl(cluster.nodes[0], "apply", "-f", str(path)).returncode == 0
    ready = exoctl(cluster.nodes[0], "wait", "md/two", "--for=condition=Ready", "--timeout=90s")
    assert ready.returncode == 0, ready.stderr
    used = conditions(cluster.nodes[2], "two")["AllNodesUsed"]
    assert used["status"] == "False" and used["reason"] == "NodesWithoutLayers"
    assert "got no layers: the model has 2 layers and a stage holds at least one" in used["message"]
    described = exoctl(cluster.nodes[1], "describe", "md", "two")
    assert described.returncode == 0 and "NodesWithoutLayers" in described.stdout
    assert "got no layers" in described.stdout


def test_a_prompt_beyond_the_reserved_context_length_is_refused_and_a_short_one_served(world):
    cluster, _, _ = world
    status, _, body = cluster.nodes[2].request("POST", "/v1/completions",
                                               body={"model": "two", "prompt": "hello world " * 40, "max_tokens": 4})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "context length of 64" in body["error"]["message"]
    status, _, body = cluster.nodes[2].request("POST", "/v1/completions",
                                               body={"model": "two", "prompt": "hello", "max_tokens": 4})
    assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= 4, body


def test_a_server_dry_run_shows_the_kv_reservation_and_what_does_not_fit_per_node(world):
    cluster, models, root = world
    path = root / "dry.json"
    path.write_text(json.dumps(manifest("dry", models["two"], contextLength=512, maxConcurrentRequests=2)))
    fits = exoctl(cluster.nodes[0], "apply", "--dry-run=server", "-f", str(path))
    assert fits.returncode == 0, fits.stderr
    header, *rows = [line.split() for line in fits.stdout.splitlines()[1:]]
    assert header == ["REPLICA", "STAGE", "NODE", "LAYERS", "MEMORY", "KV", "CACHE", "OVERHEAD"]
    # 1 layer per stage × 1 KV head of 16 × K and V × bf16 × 512 tokens × 2 requests = 64 KiB.
    assert [row[6:8] for row in rows] == [["64.0", "KiB"]] * 2
    path.write_text(json.dumps(manifest("dry", models["two"], contextLength=1 << 24, maxConcurrentRequests=1024)))
    too_long = exoctl(cluster.nodes[0], "apply", "--dry-run=server", "-f", str(path))
    reason = too_long.stdout.splitlines()[-1]
    assert reason.startswith("Unschedulable: needs 0.0 GiB of weights + ") and "of KV cache (1024 requests" in reason
    assert "3 Ready nodes offer" in reason and all(f"{n.name} 15." in reason for n in cluster.nodes)


def test_a_request_beyond_the_reserved_concurrency_is_refused_with_retry_after_until_a_slot_frees(world):
    from exo_ctl.model_builder.build_model import build_model

    cluster, _, root = world
    path = root / "one-slot.json"
    body = manifest("one-slot", build_model("tiny"), maxConcurrentRequests=1)
    body["spec"]["placement"]["strategy"] = "Pack"
    path.write_text(json.dumps(body))
    assert exoctl(cluster.nodes[0], "apply", "-f", str(path)).returncode == 0
    ready = exoctl(cluster.nodes[0], "wait", "md/one-slot", "--for=condition=Ready", "--timeout=90s")
    assert ready.returncode == 0, ready.stderr
    long = {"model": "one-slot", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": True}
    entry = cluster.nodes[1]
    running = http.client.HTTPConnection("127.0.0.1", entry.api_port, timeout=60)
    try:  # a stream that holds the one slot
        running.request("POST", "/v1/completions", body=json.dumps(long),
                        headers={"Authorization": f"Bearer {entry.secret}", "Content-Type": "application/json"})
        answer = running.getresponse()
        assert answer.status == 200 and answer.readline().startswith(b"data: ")
        status, headers, refused = cluster.nodes[2].request(
            "POST", "/v1/completions", body={"model": "one-slot", "prompt": "Hi", "max_tokens": 2})
        assert status == 503 and refused["error"]["code"] == "model_not_ready", refused
        assert "already runs 1 requests, all it reserved KV cache for" in refused["error"]["message"]
        assert headers.get("Retry-After") == "1"
    finally:
        running.close()
    served = wait_until(lambda: cluster.nodes[2].request(  # the first client left: its slot is free again
        "POST", "/v1/completions", body={"model": "one-slot", "prompt": "Hi", "max_tokens": 2})[0] == 200,
        timeout=10, what="served once the slot is free", cluster=cluster)
    assert served
