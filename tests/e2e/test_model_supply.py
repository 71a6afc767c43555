"""Model supply through real ``exo`` processes on 127.0.0.1: nodes that do not have a model fetch
only their layers' tensors, from the member that has it over the authenticated data port, or from
a hub (a loopback server in the Hugging Face HTTP layout, so the real huggingface_hub code runs)
for what no live peer can give."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.cluster import DEFAULT_SECRET, Cluster, ExoProcess, wait_until
from harness.serving import API, Reference, apply, client_for, shards_of, wait_nodes_ready, wait_serving
from reconciler.models.model_info import model_info_name
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.slow

REPO = "exo-test/tiny"
SOURCE = f"hf://{REPO}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
MAX_TOKENS = 16


def hf_home(root: Path, model: Path | None) -> Path:
    """A Hugging Face home for one node: with ``model`` in its hub cache as ``REPO``, or empty."""
    hub = root / "hub"
    hub.mkdir(parents=True)
    if model is not None:
        repo = hub / ("models--" + REPO.replace("/", "--"))
        shutil.copytree(model, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return root


def node_env(home: Path, *, hub: str | None) -> dict[str, str]:
    env = {"HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return env | ({"HF_ENDPOINT": hub} if hub else {"HF_HUB_OFFLINE": "1"})


def samples(node: ExoProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    status, _, text = node.request("GET", "/metrics")
    assert status == 200, text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted((k, v) for k, v in sample.labels.items() if k != "node"))] = sample.value
    return found


def fetched(node: ExoProcess, source: str) -> float:
    return samples(node, "exo_weights_fetched_bytes_total").get((("source", source),), 0.0)


def cached_weight_bytes(node: ExoProcess) -> int:
    """Bytes of safetensors files in the node's model cache (its default --model-cache)."""
    directory = node.data_dir / "models" / model_info_name(SOURCE, None)
    return sum(f.stat().st_size for f in directory.glob("model*.safetensors"))


def greedy_text(node: ExoProcess, deployment: str) -> str:
    reply = client_for(node).chat.completions.create(model=deployment, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                     temperature=0)
    return reply.choices[0].message.content


def start(tmp_path: Path, envs: list[dict[str, str]], extra_args: list[list[str]]) -> Cluster:
    cluster = Cluster(nodes=[], root=tmp_path / "cluster", secret=DEFAULT_SECRET)
    try:
        for index, (env, args) in enumerate(zip(envs, extra_args)):
            cluster.add_node(env=env, extra_args=args, peers=[cluster.nodes[0].api_address] if index else [])
        wait_nodes_ready(cluster, len(envs))
    except BaseException:
        print(cluster.logs())
        cluster.close()
        raise
    return cluster


def test_nodes_without_the_model_load_only_their_layers_from_the_one_member_that_has_it(
        tmp_path: Path, tiny_model: Path, tiny_reference: Reference) -> None:
    homes = [hf_home(tmp_path / f"hf{i}", tiny_model if i == 0 else None) for i in range(3)]
    cluster = start(tmp_path, [node_env(home, hub=None) for home in homes], [[], [], []])
    try:
        entry = cluster.nodes[1]  # a node with no copy: its tokenizer files come from node0 too
        apply(entry, "supply", SOURCE, strategy="Spread")
        shards = wait_serving(entry, "supply", stages=3, timeout=180)
        prompt_ids = tiny_reference.chat_ids(MESSAGES)
        expected = tiny_reference.text(tiny_reference.greedy(prompt_ids, MAX_TOKENS))
        assert greedy_text(entry, "supply") == expected
        assert greedy_text(cluster.nodes[2], "supply") == expected

        by_node = {s["spec"]["nodeName"]: s for s in shards}
        assert set(by_node) == {"node0", "node1", "node2"}
        assert cached_weight_bytes(cluster.nodes[0]) == 0, "node0 serves its own copy in place"
        assert fetched(cluster.nodes[0], "peer") == 0
        for node in cluster.nodes[1:]:
            share = by_node[node.name]["spec"]["memoryBytes"]
            on_disk = cached_weight_bytes(node)
            assert abs(on_disk - share) <= 0.1 * share, (node.name, on_disk, share)
            assert fetched(node, "peer") >= share * 0.9, node.name
            assert fetched(node, "hub") == 0, node.name
        served = samples(cluster.nodes[0], "exo_weights_served_bytes_total")
        assert sum(served.values()) >= fetched(cluster.nodes[1], "peer") + fetched(cluster.nodes[2], "peer")

        # Node status says what each holds; describe node shows it.
        status, _, node1 = entry.request("GET", f"{API}/nodes/node1")
        assert status == 200, node1
        cached = {m["name"]: m for m in node1["status"]["cachedModels"]}
        held = cached[model_info_name(SOURCE, None)]
        assert held["complete"] is False and held["bytes"] >= cached_weight_bytes(cluster.nodes[1])
    finally:
        cluster.close()
        print(cluster.logs())


def test_a_peer_that_dies_mid_transfer_leaves_the_rest_to_the_hub(tmp_path: Path, tiny_model: Path,
                                                                    tiny_reference: Reference) -> None:
    with FakeHub({REPO: tiny_model}) as hub:
        homes = [hf_home(tmp_path / f"hf{i}", tiny_model if i == 2 else None) for i in range(3)]
        envs = [node_env(home, hub=hub.endpoint) for home in homes]
        # node2 holds the model and serves it slowly; it gets no layers (serve=yes elsewhere).
        args = [["--label", "serve=yes"], ["--label", "serve=yes"], ["--weights-serve-rate", "1Mi"]]
        cluster = start(tmp_path, envs, args)
        try:
            entry = cluster.nodes[0]
            name = model_info_name(SOURCE, None)
            apply(entry, "relay", SOURCE, selector={"serve": "later"})  # placed nowhere yet
            wait_until(lambda: any(m["name"] == name for m in
                                   (entry.request("GET", f"{API}/nodes/node2")[2].get("status") or {})
                                   .get("cachedModels", [])),
                       timeout=60, what="node2 to list the model among its cached ones", cluster=cluster)
            apply(entry, "relay", SOURCE, selector={"serve": "yes"})

            def downloading() -> bool:
                shards = shards_of(entry, "relay")
                return len(shards) == 2 and all((s.get("status") or {}).get("phase") == "Downloading"
                                                and s["status"].get("bytesDownloaded", 0) > 0 for s in shards)
            wait_until(downloading, timeout=90, what="both shards Downloading from node2", cluster=cluster)
            cluster.nodes[2].kill()
            shards = wait_serving(entry, "relay", stages=2, timeout=180)

            expected = tiny_reference.text(tiny_reference.greedy(tiny_reference.chat_ids(MESSAGES), MAX_TOKENS))
            assert greedy_text(entry, "relay") == expected
            weights = [f for (repo, f) in hub.served_bytes if repo == REPO and f.endswith(".safetensors")]
            from_hub = sum(hub.served_bytes[(REPO, f)] for f in weights)
            total = sum(f.stat().st_size for f in tiny_model.glob("*.safetensors"))
            assert 0 < from_hub < total, "the hub served only what the peer had not"
            for node, shard in zip(cluster.nodes[:2], sorted(shards, key=lambda s: s["spec"]["nodeName"])):
                share = shard["spec"]["memoryBytes"]
                assert fetched(node, "peer") > 0 and fetched(node, "hub") > 0, node.name
                assert fetched(node, "peer") + fetched(node, "hub") <= share * 1.5, node.name
                assert abs(cached_weight_bytes(node) - share) <= 0.1 * share, node.name
        finally:
            cluster.close()
            print(cluster.logs())
