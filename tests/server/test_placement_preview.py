"""A server dry run of a ModelDeployment answers where its layers would go (X-Exo-Placement), and
exoctl renders that plan as a table or the reason nothing fits."""
import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers.model_info import create_model_info
from reconciler.models.model_info import info_from_directory
from tests.fake_hub import FakeHub

from exo_ctl.cli.plan import placement_from_headers, render_placement
from reconciler.server.placement_preview import PLACEMENT_HEADER, placement_preview
from reconciler.store.base import make_command
from tests.controllers.test_scheduler import node_body
from tests.server.server_helpers import APPLY, AUTH, MD_PATH

GiB = 1024**3
LLAMA_70B = yaml.safe_load((Path(__file__).resolve().parents[2] / "manifests/llama70b.yaml").read_text())


def bf16(manifest):
    model = {"source": "hf://mlx-community/Llama-3.3-70B-Instruct-bf16", "dtype": "bfloat16"}
    return {**manifest, "spec": {**manifest["spec"], "model": model}}


async def four_16gib_nodes(store):
    for name in ("n1", "n2", "n3", "n4"):
        await store.submit(make_command("create", ("Node", "", name), body=node_body(name, memory=16 * GiB)))


async def test_llama_70b_4bit_plans_onto_three_or_four_16gib_nodes_covering_every_layer(store):
    await four_16gib_nodes(store)
    preview = placement_preview(store, LLAMA_70B)
    assert preview["problem"] is None and preview["reason"] is None
    stages = preview["assignments"]
    assert 3 <= len(stages) <= 4
    assert [layer for s in stages for layer in range(s["layers"]["start"], s["layers"]["end"])] == list(range(80))
    assert all(s["memoryBytes"] <= 14 * GiB for s in stages)  # 16 GiB minus the manifest's 2 GiB headroom


async def test_bf16_70b_preview_says_how_much_it_needs_and_what_the_nodes_offer(store):
    await four_16gib_nodes(store)
    preview = placement_preview(store, bf16(LLAMA_70B))
    assert preview == {"assignments": [], "problem": "Unschedulable",
                       "reason": "needs 131.4 GiB of weights + 5.0 GiB of KV cache (4 requests × 4096 tokens) "
                                 "+ 1.2 GiB of activations and runtime, 4 Ready nodes offer 56.0 GiB "
                                 "(n1 14.0 GiB, n2 14.0 GiB, n3 14.0 GiB, n4 14.0 GiB)"}


async def test_dry_run_apply_carries_the_plan_and_writes_nothing(client, store):
    await four_16gib_nodes(store)
    revision = store.revision
    answer = await client.patch(f"{MD_PATH}/llama70b?dryRun=All", headers=APPLY, data=yaml.safe_dump(LLAMA_70B))
    assert answer.status == 201
    plan = json.loads(answer.headers[PLACEMENT_HEADER])
    assert 3 <= len(plan["assignments"]) <= 4
    assert store.revision == revision


async def test_real_writes_and_other_kinds_carry_no_plan(client, store):
    await four_16gib_nodes(store)
    answer = await client.patch(f"{MD_PATH}/llama70b", headers=APPLY, data=yaml.safe_dump(LLAMA_70B))
    assert answer.status == 201 and PLACEMENT_HEADER not in answer.headers
    node = await client.put("/apis/exo.dev/v1alpha1/nodes/n1?dryRun=All", headers=AUTH,
                            json=store.get(("Node", "", "n1")))
    assert node.status == 200 and PLACEMENT_HEADER not in node.headers


def test_the_plan_renders_as_a_table_and_a_problem_as_one_line():
    plan = {"assignments": [
        {"replica": 0, "index": 0, "stages": 2, "node": "mac-a", "layers": {"start": 0, "end": 40}, "memoryBytes": 20 * GiB},
        {"replica": 0, "index": 1, "stages": 2, "node": "mac-b", "layers": {"start": 40, "end": 80}, "memoryBytes": 19 * GiB},
    ], "problem": None, "reason": None}
    assert render_placement(plan) == [
        "REPLICA  STAGE  NODE   LAYERS  MEMORY",
        "0        1/2    mac-a  0-39    20.0 GiB",
        "0        2/2    mac-b  40-79   19.0 GiB",
    ]
    missing = {"assignments": [], "problem": "ModelNotFound", "reason": "model 'x': no such local directory"}
    assert render_placement(missing) == ["ModelNotFound: model 'x': no such local directory"]
    assert placement_from_headers({"x-exo-placement": json.dumps(missing)}) == missing
    assert placement_from_headers({"x-exo-placement": "not json"}) is None


def tiny_manifest(source):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "tiny", "namespace": "default"},
            "spec": {"model": {"source": source}, "placement": {"strategy": "Spread"}}}


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    return monkeypatch


async def test_a_recorded_model_info_is_planned_from_though_no_node_nor_hub_nor_catalog_knows_it(store, hub_env):
    hub_env.setenv("HF_HUB_OFFLINE", "1")
    await four_16gib_nodes(store)
    unknown = tiny_manifest("hf://org/not-in-any-catalog")
    assert placement_preview(store, unknown)["problem"] == "ModelNotFound"
    await create_model_info(store, info_from_directory(build_model("tiny"), source="hf://org/not-in-any-catalog",
                                                       revision=None, origin="node/n2", digests=False))
    preview = placement_preview(store, unknown)
    assert preview["problem"] is None
    assert [layer for s in preview["assignments"] for layer in range(s["layers"]["start"], s["layers"]["end"])] == list(range(8))


async def test_through_a_loopback_hub_a_model_no_node_has_is_planned_and_a_private_one_names_the_token(store, hub_env):
    await four_16gib_nodes(store)
    tiny = build_model("tiny")
    with FakeHub({"org/tiny": tiny, "org/secret": tiny}, private={"org/secret"}) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.endpoint)
        public = placement_preview(store, tiny_manifest("hf://org/tiny"))
        private = placement_preview(store, tiny_manifest("hf://org/secret"))
    assert public["problem"] is None and len(public["assignments"]) == 4
    assert private["problem"] == "ModelAccessDenied" and "HF_TOKEN" in private["reason"]
    assert store.list("ModelInfo")[0] == []  # a dry run writes nothing
