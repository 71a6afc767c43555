"""Placement end to end: real ``exo`` node processes on 127.0.0.1 load real MLX layers.

One cluster serves the whole module (starting nodes is the slow part on two cores), and the tests
run in file order on it: three nodes load the tiny model, a fourth joins and gets its share, the
dry-run plans a 70B model on the four, a node is killed with -9 and the survivors take over, the
deployment is deleted, and then the failure cases. Every node advertises ``--memory 16Gi``.

Memory check: RSS growth is compared, never absolute RSS (processes differ in imports and threads).
A node pays a fixed cost once, the first time any model arrives (the architecture's module, the
transformers tokenizer stack: ~11 MiB here), which is a third of the tiny model; so the memory
proof uses the small model (~290 MiB), deployed while tiny is loaded and those costs are paid.
Each node must grow by at most its own stage (bytesLoaded) + 16 MiB, and by less than a separate
process that loads the whole model with mlx_lm minus half of the other stages' bytes; after the
delete, each node's RSS must drop by at least 3/4 of its stage's bytes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from exo_ctl.model_builder.build_model import build_model
from reconciler.models.metadata import ModelProfile, profile_from_directory
from harness.cluster import Cluster, ExoProcess, start_cluster, wait_until

pytestmark = pytest.mark.slow

MDS = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
SHARDS = "/apis/exo.dev/v1alpha1/shards"
APPLY = "application/apply-patch+yaml"
MiB = 2**20
REPO = Path(__file__).resolve().parents[2]
EXOCTL = Path(sys.executable).with_name("exoctl")
# Beyond its weights a loaded stage costs the node its compute thread, allocator pools and the
# deployment's tokenizer (~3.5 MiB measured); the node's own churn (Raft log, HTTP) adds a little,
# and the node that holds the model also hashes it for the ModelInfo record. Measured over the stage:
# 8.5-9.5 MiB on a follower, 12.8-17 MiB on the leader (CI). Far below the check that matters, that
# a node holds much less than the whole model.
RSS_SLACK = 24 * MiB


# --- helpers -------------------------------------------------------------------------------------

def deployment(name: str, source: str, *, strategy: str = "Spread", dtype: str | None = None,
               headroom: str | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {"source": source}
    if dtype:
        model["dtype"] = dtype
    spec: dict[str, Any] = {"model": model, "replicas": 1, "placement": {"strategy": strategy}}
    if headroom:
        spec["resources"] = {"memoryHeadroom": headroom}
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def apply(node: ExoProcess, manifest: dict[str, Any]) -> dict[str, Any]:
    status, _, body = node.request("PATCH", f"{MDS}/{manifest['metadata']['name']}", body=json.dumps(manifest),
                                   content_type=APPLY)
    assert status in (200, 201), body
    return body


def get_deployment(node: ExoProcess, name: str) -> dict[str, Any] | None:
    status, _, body = node.request("GET", f"{MDS}/{name}")
    return body if status == 200 else None


def condition(md: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for item in ((md or {}).get("status") or {}).get("conditions", []):
        if item["type"] == kind:
            return item
    return {}


def shards_of(node: ExoProcess, name: str | None = None) -> list[dict[str, Any]]:
    status, _, body = node.request("GET", SHARDS)
    assert status == 200, body
    items = [s for s in body["items"] if name is None or s["spec"]["deployment"] == f"default/{name}"]
    return sorted(items, key=lambda s: (s["spec"]["replica"], s["spec"]["index"]))


def layers(shard: dict[str, Any]) -> range:
    return range(shard["spec"]["layers"]["start"], shard["spec"]["layers"]["end"])


def layer_owner(shards: list[dict[str, Any]]) -> dict[int, str]:
    return {layer: s["spec"]["nodeName"] for s in shards for layer in layers(s)}

def serving(node: ExoProcess, name: str, total: int, *, avoid: str | None = None) -> list[dict[str, Any]] | None:
    """The shards when the deployment is Ready for its generation, every shard is Ready and the
    shards cover layers 0..total-1 exactly once (none on ``avoid``); else None."""
    md = get_deployment(node, name)
    ready = condition(md, "Ready")
    if ready.get("status") != "True" or ready.get("observedGeneration") != md["metadata"]["generation"]:
        return None
    shards = shards_of(node, name)
    covered = [layer for s in shards for layer in layers(s)]
    if covered != list(range(total)) or any(s["spec"]["nodeName"] == avoid for s in shards):
        return None
    if not all((s.get("status") or {}).get("phase") == "Ready" for s in shards):
        return None
    return shards


def ready_nodes(node: ExoProcess) -> set[str]:
    status, _, body = node.request("GET", "/apis/exo.dev/v1alpha1/nodes")
    assert status == 200, body
    return {n["metadata"]["name"] for n in body["items"] if condition(n, "Ready").get("status") == "True"}


def rss(node: ExoProcess) -> int:
    return psutil.Process(node.proc.pid).memory_info().rss


def stage_bytes(profile: ModelProfile, shard: dict[str, Any]) -> int:
    spec = shard["spec"]
    return profile.stage_bytes(spec["layers"]["start"], spec["layers"]["end"], first=spec["layers"]["start"] == 0,
                               last=spec["layers"]["end"] == profile.num_layers)


WHOLE_MODEL_RSS = """
import sys, psutil, mlx.core as mx
from pathlib import Path
from mlx_lm.utils import load_model
process = psutil.Process()
before = process.memory_info().rss
model, _ = load_model(Path(sys.argv[1]))
mx.eval(model.parameters())
print(process.memory_info().rss - before)
"""


def whole_model_rss_delta(path: Path) -> int:
    """RSS growth of a fresh process that loads the whole model with mlx_lm."""
    out = subprocess.run([sys.executable, "-c", WHOLE_MODEL_RSS, str(path)], capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def exoctl(node: ExoProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXOCTL_SERVER": node.api_url, "EXOCTL_TOKEN": node.secret or ""}
    return subprocess.run([str(EXOCTL), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


# --- the shared cluster --------------------------------------------------------------------------

class World:
    def __init__(self, cluster: Cluster, model: Path) -> None:
        self.cluster, self.model = cluster, model
        self.profile = profile_from_directory(model)
        self.figures: dict[str, float] = {}

    @property
    def live(self) -> list[ExoProcess]:
        return [n for n in self.cluster.nodes if n.running]

    @property
    def api(self) -> ExoProcess:
        return self.live[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Any:
    model = build_model("tiny")
    cluster = start_cluster(3, tmp_path_factory.mktemp("placement"), extra_args=("--memory", "16Gi"))
    state = World(cluster, model)
    try:
        yield state
    finally:
        cluster.close()
        print("placement figures:", json.dumps(state.figures, sort_keys=True))
        print(cluster.logs()[-40000:])


# --- the tests, in order ---------------------------------------------------------------------------

def test_three_nodes_load_the_tiny_model_once_each_node_reading_exactly_its_stage(world):
    cluster, profile = world.cluster, world.profile
    wait_until(lambda: len(ready_nodes(world.api)) == 3, timeout=20, what="3 Ready nodes", cluster=cluster)
    started = time.monotonic()
    apply(world.api, deployment("tiny", str(world.model)))
    shards = wait_until(lambda: serving(world.api, "tiny", profile.num_layers), timeout=60, what="Ready",
                        cluster=cluster)
    world.figures["apply_to_ready_s"] = time.monotonic() - started

    assert sorted(s["spec"]["nodeName"] for s in shards) == ["node0", "node1", "node2"]
    assert sorted(layer_owner(shards)) == list(range(profile.num_layers))
    # What each node loaded is exactly its stage: its layers, plus embeddings / final norm + head.
    for shard in shards:
        assert shard["status"]["bytesLoaded"] == stage_bytes(profile, shard), shard
    assert sum(s["status"]["bytesLoaded"] for s in shards) == profile.total_bytes


def test_each_node_process_holds_only_its_own_layers_of_the_small_model_and_frees_them_on_delete(world):
    cluster = world.cluster
    small = build_model("small")
    profile = profile_from_directory(small)
    time.sleep(1.0)  # the nodes are settled with the tiny model loaded: this is their baseline
    before = {n.name: rss(n) for n in world.live}
    apply(world.api, deployment("small", str(small)))
    try:
        shards = wait_until(lambda: serving(world.api, "small", profile.num_layers), timeout=90, what="small Ready",
                            cluster=cluster)
        assert len(shards) == 3
        whole = whole_model_rss_delta(small)
        assert whole >= profile.total_bytes * 0.9, f"the whole-model process grew only {whole / MiB:.1f} MiB"
        world.figures["small_whole_model_rss_delta_MiB"] = whole / MiB
        nodes = {n.name: n for n in world.live}
        for shard in shards:
            node, own = nodes[shard["spec"]["nodeName"]], shard["status"]["bytesLoaded"]
            assert own == stage_bytes(profile, shard)
            grown = rss(node) - before[node.name]
            world.figures[f"small_rss_delta_{node.name}_MiB"] = grown / MiB
            world.figures[f"small_stage_{node.name}_MiB"] = own / MiB
            assert grown <= own + RSS_SLACK, (node.name, grown / MiB, own / MiB)
            assert grown < whole - (profile.total_bytes - own) / 2, (node.name, grown / MiB, whole / MiB)

        loaded = {n.name: rss(n) for n in world.live}
        assert world.api.request("DELETE", f"{MDS}/small")[0] == 200
        wait_until(lambda: not shards_of(world.api, "small"), timeout=20, what="small's shards gone", cluster=cluster)
        for shard in shards:
            node, own = nodes[shard["spec"]["nodeName"]], shard["status"]["bytesLoaded"]
            # Freed: at least 3/4 of the stage's bytes go back to the system (glibc and MLX keep a little).
            freed = wait_until(lambda: (f := loaded[node.name] - rss(node)) >= 0.75 * own and (f,) or None, timeout=10,
                               what=f"{node.name} freeing its stage", cluster=cluster)[0]
            world.figures[f"small_rss_freed_on_delete_{node.name}_MiB"] = freed / MiB
    finally:  # a failure here must not leave the small model on the nodes the next tests share
        if get_deployment(world.api, "small") is not None:
            world.api.request("DELETE", f"{MDS}/small")
            wait_until(lambda: not shards_of(world.api, "small"), timeout=20, what="small's shards gone")


def test_a_fourth_node_joining_takes_its_share_and_no_other_node_loads_a_new_layer(world):
    cluster, profile = world.cluster, world.profile
    before = shards_of(world.api, "tiny")
    old_ranges = {s["spec"]["nodeName"]: set(layers(s)) for s in before}
    newcomer = cluster.add_node(extra_args=("--memory", "16Gi"))
    started = time.monotonic()
    shards = wait_until(lambda: (s := serving(world.api, "tiny", profile.num_layers)) and len(s) == 4 and s,
                        timeout=60, what="Ready on four nodes", cluster=cluster)
    world.figures["join_to_ready_s"] = time.monotonic() - started
    owner_before, owner_after = layer_owner(before), layer_owner(shards)
    moved = sorted(layer for layer in owner_after if owner_after[layer] != owner_before[layer])
    # Four equal nodes hold 8 / 4 = 2 layers each. The least that can move is the newcomer's share,
    # and the placement guarantees exactly that: the old nodes keep a part of what they had.
    assert sorted(len(layers(s)) for s in shards) == [2, 2, 2, 2]
    assert all(owner_after[layer] == newcomer.name for layer in moved), (owner_before, owner_after)
    assert len(moved) == profile.num_layers // 4
    for shard in shards:
        if shard["spec"]["nodeName"] != newcomer.name:
            assert set(layers(shard)) <= old_ranges[shard["spec"]["nodeName"]], shard["spec"]


def test_server_dry_run_plans_llama_70b_4bit_on_four_16gib_nodes_and_explains_why_bf16_does_not_fit(world, tmp_path):
    fits = exoctl(world.api, "apply", "--dry-run=server", "-f", "manifests/llama70b.yaml")
    assert fits.returncode == 0, fits.stderr
    lines = fits.stdout.splitlines()
    assert lines[0] == "modeldeployment.exo.dev/llama70b created (server dry run)"
    assert lines[1].split() == ["REPLICA", "STAGE", "NODE", "LAYERS", "MEMORY", "KV", "CACHE", "OVERHEAD"]
    rows = [line.split() for line in lines[2:]]
    assert 3 <= len(rows) <= 4, fits.stdout
    assert len({row[2] for row in rows}) == len(rows)
    spans = [tuple(int(x) for x in row[3].split("-")) for row in rows]
    assert [layer for a, b in spans for layer in range(a, b + 1)] == list(range(80)), fits.stdout
    # Weights + KV cache (4 requests × 4096 tokens) + overhead within 16 GiB minus the 2 GiB headroom.
    assert all(float(row[4]) + float(row[6]) + float(row[8]) <= 14.0 for row in rows), fits.stdout
    assert all(row[7] == row[9] == "GiB" and float(row[6]) > 0 for row in rows), fits.stdout
    assert get_deployment(world.api, "llama70b") is None  # a dry run writes nothing

    manifest = tmp_path / "llama70b-bf16.yaml"
    manifest.write_text((REPO / "manifests/llama70b.yaml").read_text()
                        .replace("Llama-3.3-70B-Instruct-4bit", "Llama-3.3-70B-Instruct-bf16")
                        .replace("dtype: 4bit", "dtype: bfloat16"))
    too_big = exoctl(world.api, "apply", "--dry-run=server", "-f", str(manifest))
    assert too_big.returncode == 0, too_big.stderr
    assert too_big.stdout.splitlines()[1].startswith("Unschedulable: needs 131."), too_big.stdout
    # What each node offers, after the 2 GiB headroom and the tiny deployment's reservation.
    assert "of KV cache (4 requests × 4096 tokens)" in too_big.stdout and "4 Ready nodes offer 5" in too_big.stdout


def test_kill_9_of_a_shard_holder_is_ready_again_on_the_survivors_within_10_seconds(world):
    cluster, profile = world.cluster, world.profile
    leader = cluster.leader()
    holders = {s["spec"]["nodeName"] for s in shards_of(world.api, "tiny")}
    victim = next(n for n in world.live if n is not leader and n.name in holders)
    victim.kill()
    started = time.monotonic()
    shards = wait_until(lambda: serving(leader, "tiny", profile.num_layers, avoid=victim.name), timeout=30,
                        what="Ready again without the killed node", cluster=cluster)
    elapsed = time.monotonic() - started
    world.figures["kill9_to_ready_s"] = elapsed
    print(f"kill -9 of {victim.name} -> Ready on the survivors in {elapsed:.2f}s")
    assert {s["spec"]["nodeName"] for s in shards} == {n.name for n in world.live}
    assert elapsed < 10.0


def test_exoctl_wait_returns_when_ready_and_get_shards_shows_the_layout(world):
    apply(world.api, deployment("waited", str(world.model), strategy="Pack"))
    waited = exoctl(world.api, "wait", "md/waited", "--for=condition=Ready", "--timeout=60s", timeout=90)
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip() == "modeldeployment.exo.dev/waited condition met"
    assert condition(get_deployment(world.api, "waited"), "Ready")["status"] == "True"

    table = exoctl(world.api, "get", "shards")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["DEPLOYMENT", "REPLICA", "INDEX", "LAYERS", "NODE", "PHASE", "PROGRESS", "AGE"]
    waited_rows = [row.split() for row in rows if row.startswith("default/waited ")]
    assert waited_rows == [["default/waited", "0", "0", f"0-7/{world.profile.num_layers}",
                            shards_of(world.api, "waited")[0]["spec"]["nodeName"], "Ready", "100%",
                            waited_rows[0][-1]]]
    wide = exoctl(world.api, "get", "shards", "-o", "wide")
    assert wide.stdout.splitlines()[0].split() == ["NAME", "DEPLOYMENT", "REPLICA", "INDEX", "LAYERS", "NODE",
                                                   "PHASE", "PROGRESS", "AGE", "MESSAGE"]
    assert any(line.startswith("waited-r0-s0 ") for line in wide.stdout.splitlines())
    assert world.api.request("DELETE", f"{MDS}/waited")[0] == 200


def test_deleting_the_deployment_unloads_every_node_and_leaves_nothing_in_the_store(world):
    cluster = world.cluster
    held = {s["spec"]["nodeName"]: s for s in shards_of(world.api, "tiny")}
    nodes = [n for n in world.live if n.name in held]
    log_sizes = {n.name: n.log_path.stat().st_size for n in nodes}
    assert world.api.request("DELETE", f"{MDS}/tiny")[0] == 200
    wait_until(lambda: not shards_of(world.api) and get_deployment(world.api, "tiny") is None, timeout=20,
               what="cleaned up", cluster=cluster)

    def unloaded(node: ExoProcess) -> bool:
        with open(node.log_path, "rb") as log:
            log.seek(log_sizes[node.name])
            return f"unloading shard {held[node.name]['metadata']['name']}".encode() in log.read()

    wait_until(lambda: all(unloaded(n) for n in nodes), timeout=10, what="unloaded on every node", cluster=cluster)


def test_a_model_too_big_for_the_cluster_is_unschedulable_with_the_reason(world):
    # The tiny model in float32, with all but 20 MiB of each 16 GiB node kept free: it cannot fit.
    # (A 70B model is planned from the catalog by the dry run above; a deployment is planned only
    # from the model's own metadata, which no hub gives here.)
    apply(world.api, deployment("huge", str(world.model), dtype="float32", strategy="Pack",
                                headroom=f"{16 * 1024 - 20}Mi"))
    ready = wait_until(lambda: (c := condition(get_deployment(world.api, "huge"), "Ready")).get("reason") and c,
                       timeout=10, what="judged", cluster=world.cluster)
    assert ready["status"] == "False" and ready["reason"] == "Unschedulable"
    assert re.match(r"needs [\d.]+ GiB of weights \+ [\d.]+ GiB of KV cache", ready["message"]), ready["message"]
    assert "3 Ready nodes offer" in ready["message"], ready["message"]
    assert shards_of(world.api, "huge") == []
    assert world.api.request("DELETE", f"{MDS}/huge")[0] == 200


def test_a_missing_model_path_is_reported_as_model_not_found(world, tmp_path):
    apply(world.api, deployment("missing", str(tmp_path / "no-such-model")))
    ready = wait_until(lambda: (c := condition(get_deployment(world.api, "missing"), "Ready")).get("reason") and c,
                       timeout=10, what="judged", cluster=world.cluster)
    assert ready["status"] == "False" and ready["reason"] == "ModelNotFound"
    assert "no-such-model" in ready["message"] and "no such local directory" in ready["message"]
    assert shards_of(world.api, "missing") == []
    assert world.api.request("DELETE", f"{MDS}/missing")[0] == 200


def test_a_model_the_leader_can_plan_but_nodes_cannot_load_ends_as_failed_shards_with_a_message(world, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in world.model.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:  # the header (all the planner reads) stays; the last tensors are cut off
        f.truncate(weights.stat().st_size // 2)
    apply(world.api, deployment("broken", str(broken)))

    def failed() -> list[dict[str, Any]] | None:
        shards = shards_of(world.api, "broken")
        phases = [(s.get("status") or {}).get("phase") for s in shards]
        return shards if shards and "Failed" in phases and all(p in ("Failed", "Ready") for p in phases) else None

    shards = wait_until(failed, timeout=30, what="Failed", cluster=world.cluster)
    messages = [s["status"]["message"] for s in shards if s["status"]["phase"] == "Failed"]
    assert all("invalid data offsets" in m or "model.safetensors" in m for m in messages), messages
    ready = wait_until(lambda: (c := condition(get_deployment(world.api, "broken"), "Ready")).get("reason") == "ShardFailed"
                       and c, timeout=10, what="ShardFailed", cluster=world.cluster)
    assert ready["status"] == "False" and "shard broken-r0-s" in ready["message"]
    assert world.api.request("DELETE", f"{MDS}/broken")[0] == 200
    wait_until(lambda: not shards_of(world.api), timeout=10, what="cleaned up", cluster=world.cluster)

